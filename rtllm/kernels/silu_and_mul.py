"""``silu(gate) * up`` of a fused ``[T, 2d]`` gate/up projection (Triton), plus a reference.

The kernel computes in float32 and rounds once to the input dtype. PyTorch's
``F.silu(gate) * up`` in a 16-bit dtype rounds twice (after the SiLU and after the
product), so 16-bit results may differ from it by about one ulp.

With ``fp8_out`` one program takes a whole row and quantizes it per token to FP8 E4M3
(the input of an FP8 down projection, :class:`rtllm.quantization.rtn.Fp8Tokens`),
bit for bit what :func:`rtllm.kernels.fp8_linear.quantize_per_token_fp8` gives for the
16-bit output, without writing and re-reading that output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtllm.kernels.fp8_linear import fp8_codes, fp8_row_scale
from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers
from rtllm.quantization.rtn import FP8_DTYPE, Fp8Tokens

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024
_FP8_BLOCK = 2048  # the fused FP8 kernel's column tile (wider rows take two passes)


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) * up`` of float32 tiles: the one formula of every kernel that applies
    the activation (here and the gated GEMV's epilogue), so they agree bit for bit."""
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    d,
    stride_x,
    stride_o,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    # Program (row, j) handles columns [j * BLOCK, (j + 1) * BLOCK) of one row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul(gate, up)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_tile(x_row, k, d, offs, BLOCK: tl.constexpr):
    """``silu(gate) * up`` of columns ``[k, k + BLOCK)``, rounded to the input dtype as
    the unfused kernel stores it, in float32 (0 past ``d``)."""
    mask = k + offs < d
    gate = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + k + offs, mask=mask, other=0.0).to(tl.float32)
    return silu_mul(gate, up).to(x_row.dtype.element_ty).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    d,
    stride_x,
    stride_q,
    BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    # One program per row: the row's amax sets its scale. A row wider than one tile
    # is read twice (amax, then codes; the second read mostly hits L2) rather than
    # held in registers, which would leave one program per SM.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    if ONE_TILE:
        y = _silu_mul_tile(x_row, 0, d, offs, BLOCK)
        amax = tl.max(tl.abs(y), axis=0)
    else:
        running = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, d, BLOCK):
            running = tl.maximum(running, tl.abs(_silu_mul_tile(x_row, k, d, offs, BLOCK)))
        amax = tl.max(running, axis=0)
    scale = fp8_row_scale(amax)
    tl.store(scale_ptr + row, scale)
    if ONE_TILE:
        tl.store(q_ptr + row * stride_q + offs, fp8_codes(y, scale), mask=offs < d)
    else:
        for k in range(0, d, BLOCK):
            y = _silu_mul_tile(x_row, k, d, offs, BLOCK)
            tl.store(q_ptr + row * stride_q + k + offs, fp8_codes(y, scale), mask=k + offs < d)


def silu_and_mul_fp8(x: torch.Tensor, block: int | None = None, num_warps: int | None = None) -> Fp8Tokens:
    """:func:`silu_and_mul` of a 2-D ``x`` ``[T, 2 * d]`` (16-bit or float32, last dim
    contiguous), quantized per token to FP8 E4M3 in the same kernel (CUDA with FP8).

    ``block`` / ``num_warps`` override the column tile and warps (benchmarks).
    """
    if x.dim() != 2 or x.shape[-1] % 2 != 0 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, 2 * d] with a contiguous last dim, got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    rows, d = x.shape[0], x.shape[1] // 2
    codes = torch.empty(rows, d, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows and d:
        block = block or min(_FP8_BLOCK, triton.next_power_of_2(d))
        pdl = use_pdl(x.device)
        _silu_and_mul_fp8_kernel[(rows,)](
            x,
            codes,
            scale,
            d,
            x.stride(0),
            codes.stride(0),
            BLOCK=block,
            ONE_TILE=block >= d,
            USE_PDL=pdl,
            num_warps=num_warps or max(1, min(8, block // 256)),
            launch_pdl=pdl,
        )
    return Fp8Tokens(codes, scale, x.dtype)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` ``[..., 2 * d]``.

    Args:
        x: float16/bfloat16/float32 ``[T, 2 * d]`` (row stride free, last dim
            contiguous); more leading dims are flattened (copying if no view exists).
        out: optional ``[..., d]`` output of ``x``'s dtype (row stride free).

    Returns:
        ``[..., d]`` in ``x``'s dtype.
    """
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be [..., 2 * d], got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    d = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], d)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != out_shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {out_shape} {x.dtype} on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.dim() != 2 and not out.is_contiguous():
        raise ValueError("an out of other than 2 dims must be contiguous")
    x2 = x if x.dim() == 2 else x.reshape(-1, 2 * d)
    out2 = out if out.dim() == 2 else out.view(-1, d)
    if x2.stride(-1) != 1 or out2.stride(-1) != 1:
        raise ValueError("x's and out's last dims must be contiguous (stride 1)")
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(d))
    pdl = use_pdl(x.device)
    _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
        x2,
        out2,
        d,
        x2.stride(0),
        out2.stride(0),
        BLOCK=block,
        USE_PDL=pdl,
        num_warps=4 if block >= 1024 else max(1, block // 256),
        launch_pdl=pdl,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`silu_and_mul`: float32 math, one rounding."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
