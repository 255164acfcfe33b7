"""Attention backends: ``torch`` (reference, any device) and, on CUDA, ``triton``."""

from __future__ import annotations

from collections.abc import Callable

from rtllm.layers.attention_backends.base import (
    AttentionBackend,
    AttentionLayerSpec,
    KVCacheLayer,
    QuantizedKVCache,
    StepAttentionInputs,
)
from rtllm.layers.attention_backends.torch_backend import TorchAttentionBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}


def _load_triton_backend() -> type[AttentionBackend]:
    # Imported on first use so that `import rtllm` works without triton installed.
    from rtllm.layers.attention_backends.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend


# Backends whose modules import optional packages: loaded (and registered) on first use.
_LAZY_BACKENDS: dict[str, Callable[[], type[AttentionBackend]]] = {
    "triton": _load_triton_backend,
}


def available_attention_backends() -> list[str]:
    """Names accepted by :func:`get_attention_backend` (optional ones may fail to import)."""
    return sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))


def get_attention_backend(name: str) -> AttentionBackend:
    """Instantiate the attention backend called ``name``."""
    if name not in _BACKENDS and name in _LAZY_BACKENDS:
        try:
            _BACKENDS[name] = _LAZY_BACKENDS[name]()
        except ImportError as exc:
            raise ImportError(f"attention backend {name!r} needs {exc.name or exc}") from exc
    if name not in _BACKENDS:
        raise ValueError(
            f"attention backend must be one of {available_attention_backends()}, got {name!r}"
        )
    return _BACKENDS[name]()


__all__ = [
    "AttentionBackend",
    "AttentionLayerSpec",
    "KVCacheLayer",
    "QuantizedKVCache",
    "StepAttentionInputs",
    "TorchAttentionBackend",
    "available_attention_backends",
    "get_attention_backend",
]
