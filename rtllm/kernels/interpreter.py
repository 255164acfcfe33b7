"""Running the Triton kernels in Triton's interpreter (CPU; tests and ``--smoke`` runs)."""

from __future__ import annotations


def patch_triton_interpreter() -> None:
    """Make Triton 3.6's interpreter work with numpy >= 2.4.

    The interpreter holds scalars as 1-element numpy arrays and converts them with
    ``int(array)``, which numpy 2.4 rejects, so ``range(lo, hi)`` over runtime bounds
    fails (triton-lang/triton#9171, fixed upstream after 3.6). Convert with ``.item()``.
    Idempotent; a no-op without Triton.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_rtllm_patched", False):
        return

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._rtllm_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched
