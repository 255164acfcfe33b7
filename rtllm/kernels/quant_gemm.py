"""Weight-only quantized linears (W4A16, W8A16): dispatch, tiled GEMM, dequantize + cuBLAS.

Entry point :func:`quant_linear` (``x @ dequant(W)^T + bias``). Weight layout and the
shared dequantization helper: :mod:`rtllm.kernels.quant_layout` (re-exported here, the
historical home of the packing API). Paths, picked per ``(M bucket, N, K, format)``:

* ``"gemv_mma"`` (``M <= 8``, int4, CUDA with NVRTC): :mod:`rtllm.kernels.quant_gemv_mma`,
  a CUDA C++ kernel that feeds 16-bit dequantized codes to the tensor cores.
* ``"gemv"`` (``M <= 8``, decode): :mod:`rtllm.kernels.quant_gemv`, float32 FMAs with
  the zero point and scale applied per block on the accumulator side.
* ``"gemm"``: ``_gemm_kernel`` below, ``BLOCK_M x BLOCK_N`` tiles; each K step loads a
  ``[BLOCK_N, 4*CHUNK]`` word tile once and issues ``F`` ``tl.dot`` calls, one per
  field ``j``: ``out^T += W_j x_j^T`` with ``x_j`` the matching ``[BLOCK_M, 4*CHUNK]``
  slice of ``x`` (the order of the K sum does not matter, so no unpacking shuffle is
  needed; the weights as the A operand stay in registers). Split-K over grid
  axis 2 writes float32 partials that ``_splitk_reduce_kernel`` sums.
* ``"dequant"`` (``M >= DEQUANT_MIN_M`` only): dequantize the weight into a 16-bit
  scratch ``[N, K]`` and call cuBLAS. It moves ``bits/8 + 4`` bytes per weight (read
  codes, write and re-read 16-bit values) against cuBLAS-bf16's 2, so it can only win
  where the GEMM is compute-bound (large M) and cuBLAS's tensor-core efficiency beats
  the tiled kernel's by more than the extra traffic costs.

Tuning: on CUDA, the first call of a key times the candidate configurations
(:func:`candidates`) in CUDA graphs of back-to-back calls over copies of the weight
that overflow L2 (:mod:`rtllm.kernels.graph_timing`), as a decode step runs them, and
caches the fastest; during CUDA graph capture, or with ``RTLLM_QUANT_TUNE=0``, the
first candidate (the heuristic default) runs untimed. The engine's warm-up forward of
every captured batch size runs outside the graph, so tuning happens there.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtllm.kernels.quant_gemv import GEMV_MAX_BLOCK_M, GemvConfig, gemv_supported, quant_gemv
from rtllm.kernels.quant_gemv_mma import MmaGemvConfig, mma_gemv
from rtllm.kernels.quant_layout import (
    MAGIC_64,
    MAGIC_1024,
    PackedInt4Weight,
    PackedInt8Weight,
    PackedQuantWeight,
    dequant_field,
    dequantize_int4,
    dequantize_int8,
    dequantize_packed,
    dequantize_weight,
    field_zero,
    prepack_int4,
    prepack_int8,
    quant_linear_ref,
    unpack_codes,
)
from rtllm.kernels.quant_tuning import (
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    QuantGemmConfig,
    candidates,
    gemm_split,
    num_sms,
    pick,
    tuned_configs,
    tuning_timings,
)

__all__ = [
    "DEQUANT_MIN_M",
    "GEMV_MAX_M",
    "PackedInt4Weight",
    "PackedInt8Weight",
    "PackedQuantWeight",
    "QuantGemmConfig",
    "candidates",
    "dequantize_weight",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_packed",
    "prepack_int4",
    "prepack_int8",
    "quant_linear",
    "quant_linear_ref",
    "quant_linear_silu_and_mul",
    "tuned_configs",
    "tuning_timings",
    "unpack_codes",
    "w4a16_linear",
    "w8a16_linear",
]

_SUPPORTED_X = (torch.float16, torch.bfloat16, torch.float32)


# ---- kernels -----------------------------------------------------------------------------


# M varies with every prompt: one compiled variant per tile shape, not per M % 16.
@triton.jit(do_not_specialize=["M", "blocks_per_split"])
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    M,
    N,
    num_blocks,
    blocks_per_split,
    group_blocks,
    stride_xm,
    stride_om,
    mag_1024,
    mag_64,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    FIELDS: tl.constexpr = 32 // BITS
    T: tl.constexpr = CHUNK * 4  # words per K step (the K of each tl.dot)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_t = tl.arange(0, T)
    t_blk = offs_t // 4
    w_rows = qw_ptr + offs_n.to(tl.int64)[:, None] * (num_blocks * 4) + offs_t[None, :]
    # Column t of x's slice for field j is input channel 4F*(block of t) + 4j + t % 4.
    x_rows = (
        x_ptr
        + offs_m.to(tl.int64)[:, None] * stride_xm
        + (t_blk * (4 * FIELDS) + offs_t % 4)[None, :]
    )
    lo = pid_k * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, num_blocks)
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    # out^T = W x^T: the dequantized weights are the dot's A operand, which wgmma takes
    # from registers (as B they would be shuffled into the operand layout: sm_90
    # SASS of a 16x64 tile, 9.6 -> 7.8 instructions per code).
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for start in range(lo, hi, CHUNK):
        blk = start + t_blk
        t_mask = blk < hi
        w = tl.load(w_rows + start * 4, mask=n_mask[:, None] & t_mask[None, :], other=0)
        if not PER_CHANNEL:
            g_off = (blk // group_blocks)[None, :] * N + offs_n[:, None]
            g_mask = n_mask[:, None] & t_mask[None, :]
            s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        x_blk = x_rows + start * (4 * FIELDS)
        xt_mask = m_mask[:, None] & t_mask[None, :]
        for j in tl.static_range(FIELDS):
            xj = tl.load(x_blk + 4 * j, mask=xt_mask, other=0.0)
            # Masked words dequantize to finite values that meet x == 0. The field's
            # magic offset (1024 or 64, quant_layout.dequant_field) and zero cancel
            # exactly.
            wj = dequant_field(w, mag_1024, mag_64, j, BITS) - field_zero(z, j, BITS)
            wj = (wj * s).to(xj.dtype)
            acc = tl.dot(wj, tl.trans(xj), acc, input_precision=DOT_PRECISION)
    if SPLIT:
        ws = ws_ptr + (pid_k.to(tl.int64) * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(ws, tl.trans(acc), mask=m_mask[:, None] & n_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(
            out, tl.trans(acc).to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :]
        )


@triton.jit(do_not_specialize=["M", "split_k"])
def _splitk_reduce_kernel(
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    split_k,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# ---- launchers ---------------------------------------------------------------------------


def _check(x: torch.Tensor, packed: PackedQuantWeight, bias: torch.Tensor | None) -> None:
    if x.dtype not in _SUPPORTED_X:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {packed.in_features}")
    if packed.qweight.device != x.device:
        raise ValueError(f"weight on {packed.qweight.device}, x on {x.device}")
    if bias is not None and bias.shape != (packed.out_features,):
        raise ValueError(f"bias must be [{packed.out_features}], got {tuple(bias.shape)}")


def _gemv_config(cfg: QuantGemmConfig) -> GemvConfig:
    return GemvConfig(
        cfg.block_n or 8, cfg.chunk or 32, cfg.split_k or 1, cfg.num_warps or 1, cfg.num_stages or 1
    )


def _mma_gemv_config(cfg: QuantGemmConfig) -> MmaGemvConfig:
    default = MmaGemvConfig()
    return MmaGemvConfig(
        cfg.num_warps or default.warps, cfg.chunk or default.step_blocks, cfg.num_stages or default.stages
    )


def _as_rows(x: torch.Tensor, packed: PackedQuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Checked ``x`` as ``[M, K]`` rows with a contiguous last dim."""
    _check(x, packed, bias)
    x2 = x.reshape(-1, packed.in_features)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _run(
    x2: torch.Tensor,
    packed: PackedQuantWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: QuantGemmConfig,
) -> None:
    """Compute into ``out`` ``[M, N]`` with a complete configuration."""
    m, k = x2.shape
    n = packed.out_features
    if cfg.kernel == "gemv":
        gemv = _gemv_config(cfg)
        for r in range(0, m, GEMV_MAX_BLOCK_M):  # row tiles (M > 8 only when forced)
            quant_gemv(
                x2[r : r + GEMV_MAX_BLOCK_M], packed, bias, out[r : r + GEMV_MAX_BLOCK_M], gemv
            )
        return
    if cfg.kernel == "gemv_mma":
        mma_gemv(x2, packed, bias, out, _mma_gemv_config(cfg))
        return
    if cfg.kernel == "dequant":
        w = dequantize_weight(packed, x2.dtype)
        out.copy_(F.linear(x2, w, bias))
        return
    if cfg.kernel != "gemm":
        raise ValueError(
            f"kernel must be 'gemv', 'gemv_mma', 'gemm' or 'dequant', got {cfg.kernel!r}"
        )
    on_gpu = x2.is_cuda
    block_m = cfg.block_m or (16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128)
    block_n = cfg.block_n or (64 if m <= 16 or not on_gpu else 128 if m <= 64 else 256)
    chunk = cfg.chunk or 4
    if 4 * chunk < 16:
        raise ValueError(f"chunk must be >= 4 for the GEMM kernel, got {chunk}")
    num_warps = cfg.num_warps or (8 if block_m * block_n >= 128 * 128 else 4)
    fields = 32 // packed.bits
    num_blocks = k // (4 * fields)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    sms = num_sms(x2.device.index or 0) if on_gpu else 4
    split = cfg.split_k or gemm_split(tiles, num_blocks, chunk, sms)
    steps = triton.cdiv(num_blocks, chunk)
    split = max(1, min(split, steps))
    blocks_per_split = triton.cdiv(steps, split) * chunk
    split = triton.cdiv(num_blocks, blocks_per_split)  # drop slices left empty by rounding
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if split > 1 else out
    has_bias = bias is not None
    bias_arg = bias if has_bias else out  # unused when HAS_BIAS is False
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _gemm_kernel[grid](
        x2,
        packed.qweight,
        packed.scales,
        packed.zeros,
        bias_arg,
        out,
        ws,
        m,
        n,
        num_blocks,
        blocks_per_split,
        packed.group_size // (4 * fields),
        x2.stride(0),
        out.stride(0),
        MAGIC_1024,
        MAGIC_64,
        BITS=packed.bits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CHUNK=chunk,
        PER_CHANNEL=packed.per_channel,
        HAS_BIAS=has_bias,
        SPLIT=split > 1,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=cfg.num_stages or 2,
    )
    if split > 1:
        rb = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(m, triton.cdiv(n, rb))](
            ws,
            bias_arg,
            out,
            m,
            n,
            split,
            out.stride(0),
            HAS_BIAS=has_bias,
            BLOCK_N=rb,
            num_warps=4,
        )


def quant_linear(
    x: torch.Tensor,
    packed: PackedQuantWeight,
    bias: torch.Tensor | None = None,
    config: QuantGemmConfig | None = None,
) -> torch.Tensor:
    """``x @ dequant(packed)^T + bias`` with in-kernel dequantization (int4 or int8).

    Args:
        x: ``[..., K]`` float16/bfloat16 (float32 works: ieee dots, for CPU tests),
            last dim contiguous; leading dims are flattened.
        packed: from :func:`prepack_int4` / :func:`prepack_int8`, on ``x``'s device.
        bias: optional ``[N]``, added in float32.
        config: a forced configuration (tests, the benchmark); ``kernel=None`` tunes
            (module docstring).

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    x2 = _as_rows(x, packed, bias)
    m, n = x2.shape[0], packed.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    if config is None or config.kernel is None:
        picked = pick(x2, packed, bias, _run)
        if config is not None:  # the given fields override the picked configuration
            given = {f: getattr(config, f) for f in config.__dataclass_fields__}
            picked = replace(picked, **{f: v for f, v in given.items() if v is not None})
        config = picked
    _run(x2, packed, bias, out, config)
    return out.reshape(*x.shape[:-1], n)


def quant_linear_silu_and_mul(
    x: torch.Tensor, packed: PackedQuantWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``silu(gate) * up`` of :func:`quant_linear` for a ``[gate; up]`` weight (``N = 2 d``
    rows: the MLP's fused gate/up projection), ``[..., d]`` in ``x``'s dtype.

    Where the tuned path for this size is the GEMV (decode), one launch computes both
    halves and applies the activation in its epilogue (no ``[M, 2 d]`` intermediate, one
    kernel fewer per layer); the result is bit for bit the unfused one. Otherwise the
    GEMM runs, then :func:`rtllm.kernels.silu_and_mul.silu_and_mul`.
    """
    n = packed.out_features
    if n % 2:
        raise ValueError(f"a [gate; up] weight has an even number of rows, got {n}")
    x2 = _as_rows(x, packed, bias)
    m = x2.shape[0]
    cfg = pick(x2, packed, bias, _run) if gemv_supported(m) else None
    if cfg is None or cfg.kernel not in ("gemv", "gemv_mma"):
        from rtllm.kernels.silu_and_mul import silu_and_mul

        return silu_and_mul(quant_linear(x2, packed, bias)).reshape(*x.shape[:-1], n // 2)
    out = torch.empty(m, n // 2, dtype=x.dtype, device=x.device)
    if cfg.kernel == "gemv_mma":
        mma_gemv(x2, packed, bias, out, _mma_gemv_config(cfg), gated=True)
    else:
        quant_gemv(x2, packed, bias, out, _gemv_config(cfg), gated=True)
    return out.reshape(*x.shape[:-1], n // 2)


def w4a16_linear(
    x: torch.Tensor,
    packed: PackedInt4Weight,
    bias: torch.Tensor | None = None,
    config: QuantGemmConfig | None = None,
) -> torch.Tensor:
    """W4A16: :func:`quant_linear` for an int4 weight (groupwise or per channel)."""
    if packed.bits != 4:
        raise ValueError(f"w4a16_linear needs a 4-bit weight, got {packed.bits} bits")
    return quant_linear(x, packed, bias, config)


def w8a16_linear(
    x: torch.Tensor,
    packed: PackedInt8Weight,
    bias: torch.Tensor | None = None,
    config: QuantGemmConfig | None = None,
) -> torch.Tensor:
    """W8A16: :func:`quant_linear` for an int8 weight (per channel or groupwise)."""
    if packed.bits != 8:
        raise ValueError(f"w8a16_linear needs an 8-bit weight, got {packed.bits} bits")
    return quant_linear(x, packed, bias, config)
