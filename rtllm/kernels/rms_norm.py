"""RMSNorm with an optional fused residual add (Triton), plus a PyTorch reference.

Numerics follow Hugging Face's ``LlamaRMSNorm`` (and :class:`rtllm.layers.norm.RMSNorm`):

* with a residual, ``summed = x + residual`` is rounded to the input dtype first, and
  that rounded sum is both normalized and returned as the new residual;
* ``x32 * rsqrt(mean(x32 ** 2) + eps)`` in float32, cast back to the input dtype;
* ``weight * normed`` in the promoted dtype of weight and input. The product of two
  16-bit floats is exact in float32, so doing it in float32 and rounding once gives
  the same bits as PyTorch's 16-bit multiply.

With ``fp8_out`` the kernel also quantizes its output per token to FP8 E4M3 (the
input of an FP8 linear, :class:`rtllm.quantization.rtn.Fp8Tokens`): the codes and
scales equal :func:`rtllm.kernels.fp8_linear.quantize_per_token_fp8` of the unfused
output bit for bit, without writing and re-reading the 16-bit row.

Rows may be strided: ``x`` is ``[rows, N]`` or ``[T, H, N]`` (rows = ``T * H``, e.g. the
per-head q/k norm of Qwen3 over a view into a fused QKV buffer); only the last dim
has to be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.fp8_linear import fp8_codes, fp8_row_scale
from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers
from rtllm.quantization.rtn import FP8_DTYPE, Fp8Tokens

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK_N = 65536  # one tile holds a whole row
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    scale_ptr,
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
    QUANT_FP8: tl.constexpr,
    OUT_TY: tl.constexpr,
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
    if QUANT_FP8:
        # Quantize the row as the unfused kernel would have stored it (rounded to
        # OUT_TY), with quantize_per_token_fp8's scale rule.
        y = y.to(OUT_TY).to(tl.float32)
        scale = fp8_row_scale(tl.max(tl.abs(y), axis=1))
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)
        tl.store(out_ptr + o_offs, fp8_codes(y, scale[:, None]), mask=mask)
    else:
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
    fp8_out: bool = False,
) -> torch.Tensor | Fp8Tokens | tuple[torch.Tensor | Fp8Tokens, torch.Tensor]:
    """RMS-normalize the rows of ``x``; with ``residual``, add it first.

    Args:
        x: ``[rows, N]`` or ``[T, H, N]`` in float16/bfloat16/float32; row strides are
            free (views into a fused buffer work), the last dim must be contiguous.
        weight: ``[N]``; the output dtype is ``promote_types(weight.dtype, x.dtype)``.
        eps: added to the mean square.
        residual: same shape and dtype as ``x`` (strides free), or ``None``.
        inplace: write the output into ``x`` and the new residual into ``residual``
            (the output dtype must then equal ``x.dtype``).
        fp8_out: return the output quantized per token (2-D ``x`` on a GPU with FP8,
            not with ``inplace``).

    Returns:
        ``out`` without ``residual``; else ``(out, x + residual)``, both shaped like ``x``.
        With ``fp8_out``, ``out`` is :class:`Fp8Tokens` (its ``dtype`` the output dtype).
    """
    out_dtype = _check_inputs(x, weight, residual, inplace)
    if fp8_out and (inplace or x.dim() != 2):
        raise ValueError("fp8_out takes a 2-D x and no inplace")
    scale = x  # unused by the kernel without fp8_out
    if fp8_out:
        out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if inplace:
        out, res_out = x, residual
    else:
        if not fp8_out:
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
            scale,
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
            QUANT_FP8=fp8_out,
            OUT_TY=_TL_DTYPES[out_dtype],
            num_warps=max(1, min(16, block_m * block_n // 256)),
            launch_pdl=pdl,
        )
    if fp8_out:
        out = Fp8Tokens(out, scale, out_dtype)
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
