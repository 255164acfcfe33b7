"""FP8 (E4M3) linear layers through ``torch._scaled_mm``, with a per-token quantizer.

``y = (x_q * x_scale) (w_q * w_scale)^T + bias`` where ``w_q`` is float8_e4m3fn
``[N, K]`` and ``x_q`` is the activation rounded to FP8, with one scale per token
(dynamic: ``amax(|x_row|) / 448``, computed by :func:`quantize_per_token_fp8`) or one
static scale.

Where it runs:

* CUDA, compute capability >= 8.9 (Ada, Hopper): ``torch._scaled_mm`` (cuBLASLt or
  CUTLASS). Its layout rules: the first operand row-major ``[M, K]``, the second
  column-major ``[K, N]`` (``w_q.t()`` of a contiguous ``[N, K]`` weight, no copy), ``K``
  and ``N`` multiples of 16. Scales are float32: "tensorwise" (both 0-dim: static
  activation scale with a per-tensor weight scale; any output dtype) or "rowwise"
  (``scale_a [M, 1]`` and ``scale_b [1, N]``, both contiguous; this torch produces
  bfloat16 only, so other output dtypes are cast afterwards). Bias is added after the
  product in the output dtype (rowwise ``_scaled_mm`` does not take every bias dtype).
  A per-tensor weight scale used with per-token activations is expanded to ``[1, N]``
  on each call (one tiny copy); pass it as ``[N]`` (done once at load time) to avoid it.
* CUDA below 8.9 (Ampere and older): no FP8 tensor cores; :func:`fp8_linear` raises
  ``NotImplementedError`` instead of silently dequantizing the whole weight on every
  call. Dequantize once at load time (``w_q.float() * w_scale``) and use a 16-bit
  linear, or quantize to W8A16 instead.
* CPU: :func:`fp8_linear_ref`, the same math in float32 (the reference of the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtllm.quantization import rtn
from rtllm.quantization.rtn import FP8_DTYPE, Fp8Tokens, quantize_fp8

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fp8_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` has FP8 tensor cores: CUDA, capability >= 8.9."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def fp8_codes(v, scale):
    """E4M3 codes of float32 ``v`` for ``scale`` (IEEE division, as PyTorch: bit for bit)."""
    return tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0).to(tl.float8e4nv)


@triton.jit
def fp8_row_scale(amax):
    """Per-token scale from a row's float32 ``amax``: rtn's rule, ``amax / 448``, or 1
    for an all-zero row. PyTorch on CUDA divides by a Python scalar as a multiplication
    by its float32 reciprocal, so this does the same (bit for bit with the reference)."""
    return tl.where(amax > 0.0, amax * (1.0 / 448.0), 1.0)


@triton.jit
def _per_token_fp8_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if ONE_TILE:
        # The whole row fits one tile: read it once and keep it in registers.
        mask = offs < K
        v = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.max(tl.abs(v), axis=0)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            v = tl.load(x_ptr + row * stride_x + k + offs, mask=k + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        a = tl.max(amax, axis=0)
    scale = fp8_row_scale(a)
    tl.store(scale_ptr + row, scale)
    if ONE_TILE:
        tl.store(q_ptr + row * stride_q + offs, fp8_codes(v, scale), mask=mask)
    else:
        for k in range(0, K, BLOCK):
            mask = k + offs < K
            v = tl.load(x_ptr + row * stride_x + k + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptr + row * stride_q + k + offs, fp8_codes(v, scale), mask=mask)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 quantization: ``(q float8_e4m3fn [M, K], scale float32
    [M, 1])`` of a 2-D ``x``, equal to :func:`rtn.quantize_per_token_fp8`.

    One Triton pass per row on CUDA with FP8 support, else the PyTorch quantizer.
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("x must be 2-D with a contiguous last dim")
    if not fp8_supported(x.device):
        return rtn.quantize_per_token_fp8(x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        # Rows up to 16k features stay in registers (64 floats a thread at 8 warps).
        block = min(16384, triton.next_power_of_2(max(k, 16)))
        _per_token_fp8_kernel[(m,)](
            x,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            BLOCK=block,
            ONE_TILE=block >= k,
            num_warps=4 if block <= 1024 else 8,
        )
    return q, scale


def _check(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor) -> None:
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be float8_e4m3fn [N, K], got {w_fp8.dtype} {w_fp8.shape}")
    n, k = w_fp8.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"w_scale must have 1 or {n} elements, got {tuple(w_scale.shape)}")


def fp8_linear_ref(
    x: torch.Tensor | Fp8Tokens,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    input_scale: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`fp8_linear` (any device): both operands rounded to
    FP8 as the GEMM sees them, dequantized and multiplied in float32, bias added in
    float32, one rounding to ``out_dtype`` (default ``x``'s dtype)."""
    if isinstance(x, Fp8Tokens):
        _check(x.codes, w_fp8, torch.as_tensor(w_scale))
        xq, x_scale, x_dtype = x
    elif input_scale is None:
        _check(x, w_fp8, torch.as_tensor(w_scale))
        xq, x_scale = rtn.quantize_per_token_fp8(x)
        x_dtype = x.dtype
    else:
        _check(x, w_fp8, torch.as_tensor(w_scale))
        x_scale = torch.as_tensor(input_scale, dtype=torch.float32, device=x.device)
        xq = quantize_fp8(x, x_scale)
        x_dtype = x.dtype
    ws = torch.as_tensor(w_scale, dtype=torch.float32, device=xq.device).reshape(-1, 1)
    w = w_fp8.float() * ws
    y = F.linear(xq.float() * x_scale, w, None if bias is None else bias.float())
    return y.to(out_dtype or x_dtype)


def fp8_linear(
    x: torch.Tensor | Fp8Tokens,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    input_scale: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """FP8 linear (module docstring for devices and layouts).

    Args:
        x: ``[..., K]`` float16/bfloat16/float32 activations, or :class:`Fp8Tokens`
            ``[M, K]`` already quantized per token (then ``input_scale`` must be None).
        w_fp8: float8_e4m3fn ``[N, K]``, contiguous.
        w_scale: float32 per-tensor (0-dim or 1 element) or per-channel (``[N]`` or
            ``[N, 1]``) weight scale.
        input_scale: static per-tensor activation scale; ``None``: dynamic per token.
        bias: optional ``[N]``.
        out_dtype: float16/bfloat16/float32 (default ``x``'s dtype).
        use_fast_accum: ``_scaled_mm``'s faster, less exact accumulation (Hopper).

    Returns:
        ``[..., N]`` in ``out_dtype``.

    Raises:
        NotImplementedError: on a CUDA device without FP8 (capability < 8.9).
    """
    w_scale = torch.as_tensor(w_scale)
    prequantized = isinstance(x, Fp8Tokens)
    if prequantized and input_scale is not None:
        raise ValueError("input_scale must be None for activations already quantized per token")
    _check(x.codes if prequantized else x, w_fp8, w_scale)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    device = x.codes.device if prequantized else x.device
    if device.type != "cuda":
        return fp8_linear_ref(x, w_fp8, w_scale, input_scale, bias, out_dtype)
    if not fp8_supported(device):
        cap = torch.cuda.get_device_capability(device)
        raise NotImplementedError(
            f"FP8 GEMMs need compute capability >= 8.9, this GPU is sm_{cap[0]}{cap[1]}: "
            "dequantize the FP8 weights at load time or use W8A16 instead"
        )
    n, k = w_fp8.shape
    if k % 16 or n % 16:
        raise ValueError(f"_scaled_mm needs K and N multiples of 16, got K={k}, N={n}")
    if not w_fp8.is_contiguous():
        raise ValueError("w_fp8 must be contiguous [N, K] (its transpose is the column-major B)")
    w_scale = w_scale.to(device=device, dtype=torch.float32)
    if prequantized:
        xq, a_scale, _ = x
        lead_shape = xq.shape[:-1]
        if xq.dim() != 2 or not xq.is_contiguous() or a_scale.shape != (xq.shape[0], 1):
            raise ValueError("Fp8Tokens must hold contiguous codes [M, K] and scales [M, 1]")
    else:
        lead_shape = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if input_scale is not None:
            a_scale = torch.as_tensor(input_scale, dtype=torch.float32, device=device).reshape(())
            xq = quantize_fp8(x2, a_scale)
        else:
            xq, a_scale = quantize_per_token_fp8(x2)
    m = xq.shape[0]
    if a_scale.dim() == 0 and w_scale.numel() == 1:
        y = torch._scaled_mm(
            xq,
            w_fp8.t(),
            scale_a=a_scale,
            scale_b=w_scale.reshape(()),
            out_dtype=out_dtype,
            use_fast_accum=use_fast_accum,
        )
    else:
        # Rowwise: scale_a [M, 1], scale_b [1, N], both contiguous; bfloat16 output.
        if a_scale.dim() == 0:
            a_scale = a_scale.reshape(1, 1).expand(m, 1).contiguous()
        b_scale = w_scale.reshape(1, -1)
        if b_scale.shape[1] != n:
            b_scale = b_scale.expand(1, n)
        y = torch._scaled_mm(
            xq,
            w_fp8.t(),
            scale_a=a_scale,
            scale_b=b_scale.contiguous(),
            out_dtype=torch.bfloat16,
            use_fast_accum=use_fast_accum,
        )
        if out_dtype != torch.bfloat16:
            y = y.to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead_shape, n)


__all__ = [
    "Fp8Tokens",
    "fp8_linear",
    "fp8_linear_ref",
    "fp8_supported",
    "quantize_per_token_fp8",
]
