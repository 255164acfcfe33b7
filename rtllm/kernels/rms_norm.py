"""RMSNorm with an optional fused residual add (Triton), plus a PyTorch reference.

Numerics follow Hugging Face's ``LlamaRMSNorm`` (and :class:`rtllm.layers.norm.RMSNorm`):

* with a residual, ``summed = x + residual`` is rounded to the input dtype first, and
  that rounded sum is both normalized and returned as the new residual;
* ``x32 * rsqrt(mean(x32 ** 2) + eps)`` in float32, cast back to the input dtype;
* ``weight * normed`` in the promoted dtype of weight and input. The product of two
  16-bit floats is exact in float32, so doing it in float32 and rounding once gives
  the same bits as PyTorch's 16-bit multiply.

Rows may be strided: ``x`` is ``[rows, N]`` or ``[T, H, N]`` (rows = ``T * H``, e.g. the
per-head q/k norm of Qwen3 over a view into a fused QKV buffer); only the last dim
has to be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK_N = 65536  # one tile holds a whole row


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_rows,
    eps,
    stride_x0,
    stride_x1,
    stride_r0,
    stride_r1,
    stride_o0,
    stride_o1,
    stride_ro0,
    stride_ro1,
    HEADS: tl.constexpr,
    N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    # One program normalizes BLOCK_M rows; row r is (token r // HEADS, head r % HEADS).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // HEADS
    head = rows % HEADS
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    in_ty = x_ptr.dtype.element_ty

    x_offs = (token * stride_x0 + head * stride_x1)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r_offs = (token * stride_r0 + head * stride_r1)[:, None] + cols[None, :]
        r = tl.load(res_ptr + r_offs, mask=mask, other=0.0)
        # Rounded to the input dtype, like ``x + residual`` in PyTorch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(in_ty)
        ro_offs = (token * stride_ro0 + head * stride_ro1)[:, None] + cols[None, :]
        tl.store(res_out_ptr + ro_offs, x, mask=mask)

    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=1) / N
    inv_rms = tl.math.rsqrt(mean_sq + eps)
    normed = (x32 * inv_rms[:, None]).to(in_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = w[None, :] * normed
    o_offs = (token * stride_o0 + head * stride_o1)[:, None] + cols[None, :]
    tl.store(out_ptr + o_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(tokens, heads, token stride, head stride) of a 2-D or 3-D tensor."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    return t.shape[0], t.shape[1], t.stride(0), t.stride(1)


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, inplace: bool
) -> torch.dtype:
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [rows, N] or [T, H, N], got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
    if weight.dtype not in _SUPPORTED:
        raise ValueError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if not weight.is_contiguous() or weight.device != x.device:
        raise ValueError("weight must be contiguous and on x's device")
    if x.stride(-1) != 1:
        raise ValueError("x's last dim must be contiguous (stride 1)")
    if triton.next_power_of_2(n) > _MAX_BLOCK_N:
        raise ValueError(f"rows of {n} elements exceed the kernel's limit of {_MAX_BLOCK_N}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
                f"got {tuple(residual.shape)}, {residual.dtype}"
            )
        if residual.stride(-1) != 1 or residual.device != x.device:
            raise ValueError("residual's last dim must be contiguous and on x's device")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if inplace and out_dtype != x.dtype:
        raise ValueError(f"inplace needs an output dtype of {x.dtype}, weight gives {out_dtype}")
    return out_dtype


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS-normalize the rows of ``x``; with ``residual``, add it first.

    Args:
        x: ``[rows, N]`` or ``[T, H, N]`` in float16/bfloat16/float32; row strides are
            free (views into a fused buffer work), the last dim must be contiguous.
        weight: ``[N]``; the output dtype is ``promote_types(weight.dtype, x.dtype)``.
        eps: added to the mean square.
        residual: same shape and dtype as ``x`` (strides free), or ``None``.
        inplace: write the output into ``x`` and the new residual into ``residual``
            (the output dtype must then equal ``x.dtype``).

    Returns:
        ``out`` without ``residual``; else ``(out, x + residual)``, both shaped like ``x``.
    """
    out_dtype = _check_inputs(x, weight, residual, inplace)
    if inplace:
        out, res_out = x, residual
    else:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        res_out = (
            None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
        )
    tokens, heads, sx0, sx1 = _as_rows(x)
    n_rows = tokens * heads
    if n_rows > 0:
        n = x.shape[-1]
        block_n = triton.next_power_of_2(n)
        block_m = max(1, min(16, 2048 // block_n))
        pdl = use_pdl(x.device)
        res_args = (0, 0, 0, 0)
        if residual is not None:
            assert res_out is not None
            res_args = _as_rows(residual)[2:] + _as_rows(res_out)[2:]
        _rms_norm_kernel[(triton.cdiv(n_rows, block_m),)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out if res_out is not None else out,
            n_rows,
            float(eps),
            sx0,
            sx1,
            res_args[0],
            res_args[1],
            *_as_rows(out)[2:],
            res_args[2],
            res_args[3],
            HEADS=heads,
            N=n,
            HAS_RESIDUAL=residual is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            USE_PDL=pdl,
            num_warps=max(1, min(16, block_m * block_n // 256)),
            launch_pdl=pdl,
        )
    if residual is None:
        return out
    assert res_out is not None
    return out, res_out


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`rms_norm` (the math of ``rtllm.layers.norm.RMSNorm``)."""
    summed = x if residual is None else x + residual
    x32 = summed.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(x.dtype)
    return out if residual is None else (out, summed)
