"""Frozen copy of the quantized GEMV/GEMM kernels before issue 7's rewrite (commit
4b2524f, ``rtllm/kernels/quant_gemm.py``), kept only so that ``quant_gemm.py`` in this
folder can time old against new on the same GPU. Same packed layout as
:mod:`rtllm.kernels.quant_layout`; not used by the engine.

``quant_linear(x, legacy_layout(packed))``: the GEMV for ``M == 1`` (one field per shift-and-LOP3,
scales and zeros loaded per word), the tiled GEMM otherwise.
"""

# ruff: noqa
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rtllm.kernels.quant_layout import PackedQuantWeight

GEMV_MAX_M = 1
_SUPPORTED_X = (torch.float16, torch.bfloat16, torch.float32)
_MAGIC_1024 = 0x44800000  # float32 bits of 1024.0


@triton.jit
def _field(w, magic, J: tl.constexpr, BITS: tl.constexpr):
    """Field ``J`` of int32 words ``w`` as float32 ``1024 + q`` (exact, no I2F).

    ``magic`` is ``_MAGIC_1024`` passed as a kernel argument: held in a register it lets
    ptxas fuse the and-or into one LOP3 (an immediate would take LOP3's only immediate
    slot next to the mask, costing a second instruction per code).
    """
    MASK: tl.constexpr = ((1 << BITS) - 1) << 13
    if BITS * J <= 13:  # noqa: SIM108 (constexpr branch)
        v = (w << (13 - BITS * J)) & MASK
    else:
        # Arithmetic shift: the sign bits it drags in fall outside MASK.
        v = (w >> (BITS * J - 13)) & MASK
    return (v | magic).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    N,
    num_blocks,
    blocks_per_split,
    group_blocks,
    stride_xm,
    stride_om,
    magic,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    FIELDS: tl.constexpr = 32 // BITS
    T: tl.constexpr = CHUNK * 4  # words per row per K step
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = tl.arange(0, T)
    t_blk = offs_t // 4
    # Every per-step tensor is [BLOCK_N, T] or [1, T], with the same contiguity along T,
    # so Triton gives them one layout: x's values broadcast over the rows a thread holds
    # without a shared-memory layout conversion.
    w_rows = qw_ptr + offs_n.to(tl.int64)[:, None] * (num_blocks * 4) + offs_t[None, :]
    x_cols = x_ptr + m.to(tl.int64) * stride_xm + (t_blk * (4 * FIELDS) + offs_t % 4)[None, :]
    lo = pid_k * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, num_blocks)
    acc = tl.zeros([BLOCK_N, T], dtype=tl.float32)
    sx_acc = tl.zeros([1, T], dtype=tl.float32)
    w_next = tl.load(w_rows + lo * 4, mask=n_mask[:, None] & (lo + t_blk < hi)[None, :], other=0)
    for start in range(lo, hi, CHUNK):
        blk = start + t_blk
        t_mask = (blk < hi)[None, :]
        w = w_next
        # Register double buffering: the next step's loads are in flight during this
        # step's arithmetic (fully masked after the last step: no traffic).
        w_next = tl.load(
            w_rows + (start + CHUNK) * 4,
            mask=n_mask[:, None] & (blk + CHUNK < hi)[None, :],
            other=0,
        )
        x_blk = x_cols + start * (4 * FIELDS)
        if PER_CHANNEL:
            # One scale and zero per row: accumulate straight into acc, fix up at the end.
            for j in tl.static_range(FIELDS):
                xj = tl.load(x_blk + 4 * j, mask=t_mask, other=0.0).to(tl.float32)
                acc += _field(w, magic, j, BITS) * xj
                sx_acc += xj
        else:
            part = tl.zeros([BLOCK_N, T], dtype=tl.float32)
            sx = tl.zeros([1, T], dtype=tl.float32)
            for j in tl.static_range(FIELDS):
                xj = tl.load(x_blk + 4 * j, mask=t_mask, other=0.0).to(tl.float32)
                part += _field(w, magic, j, BITS) * xj
                sx += xj
            # A block lies in one group: scale and zero per (channel, block).
            g_off = (blk // group_blocks)[None, :] * N + offs_n[:, None]
            g_mask = n_mask[:, None] & t_mask
            s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32) + 1024.0
            acc += s * (part - zc * sx)
    total = tl.sum(acc, axis=1)
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) + 1024.0
        total = s * (total - zc * tl.sum(sx_acc, axis=1))
    if SPLIT:
        row = pid_k.to(tl.int64) * tl.num_programs(1) + m
        tl.store(ws_ptr + row * N + offs_n, total, mask=n_mask)
    else:
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + m.to(tl.int64) * stride_om + offs_n,
            total.to(out_ptr.dtype.element_ty),
            mask=n_mask,
        )


@triton.jit
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
    magic,
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
        zc = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None] + 1024.0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(lo, hi, CHUNK):
        blk = start + t_blk
        t_mask = blk < hi
        w = tl.load(w_rows + start * 4, mask=n_mask[:, None] & t_mask[None, :], other=0)
        if not PER_CHANNEL:
            g_off = (blk // group_blocks)[None, :] * N + offs_n[:, None]
            g_mask = n_mask[:, None] & t_mask[None, :]
            s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32) + 1024.0
        x_blk = x_rows + start * (4 * FIELDS)
        xt_mask = m_mask[:, None] & t_mask[None, :]
        for j in tl.static_range(FIELDS):
            xj = tl.load(x_blk + 4 * j, mask=xt_mask, other=0.0)
            # Masked words dequantize to finite values that meet x == 0.
            wj = ((_field(w, magic, j, BITS) - zc) * s).to(xj.dtype)
            acc = tl.dot(xj, tl.trans(wj), acc, input_precision=DOT_PRECISION)
    if SPLIT:
        ws = ws_ptr + (pid_k.to(tl.int64) * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(ws, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
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


# ---- launcher ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantGemmConfig:
    """Tuning overrides for :func:`quant_linear`; ``None`` fields use the heuristics.

    ``kernel``: ``"gemv"`` or ``"gemm"`` (default: GEMV for ``M <= GEMV_MAX_M``);
    ``chunk``: 4-word blocks per K step (GEMM: ``4 * chunk >= 16``, the dot's K);
    ``split_k``: K slices (1: no partials).
    """

    kernel: str | None = None
    block_m: int | None = None
    block_n: int | None = None
    chunk: int | None = None
    split_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_split(tiles: int, num_blocks: int, chunk: int, num_sms: int, min_chunks: int) -> int:
    """K slices so that ``tiles * split`` reaches about two programs per SM, each slice
    keeping at least ``min_chunks`` K steps (the partials cost a write and a read)."""
    if tiles >= num_sms:
        return 1
    steps = triton.cdiv(num_blocks, chunk)
    return max(1, min(triton.cdiv(2 * num_sms, tiles), steps // min_chunks))


def _check(x: torch.Tensor, packed: PackedQuantWeight, bias: torch.Tensor | None) -> None:
    if x.dtype not in _SUPPORTED_X:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {packed.in_features}")
    if packed.qweight.device != x.device:
        raise ValueError(f"weight on {packed.qweight.device}, x on {x.device}")
    if bias is not None and bias.shape != (packed.out_features,):
        raise ValueError(f"bias must be [{packed.out_features}], got {tuple(bias.shape)}")


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
        config: tuning overrides (tests and the benchmark's sweep).

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    _check(x, packed, bias)
    cfg = config or QuantGemmConfig()
    n, k = packed.out_features, packed.in_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    on_gpu = x.device.type == "cuda"
    sms = _num_sms(x.device.index or 0) if on_gpu else 4
    fields = 32 // packed.bits
    num_blocks = k // (4 * fields)
    group_blocks = packed.group_size // (4 * fields)
    kernel = cfg.kernel or ("gemv" if m <= GEMV_MAX_M else "gemm")
    has_bias = bias is not None
    bias_arg = bias if has_bias else out  # unused when HAS_BIAS is False
    if kernel == "gemv":
        # GPU: one warp per program and 4 words per thread along K (chunk = 32 *
        # num_warps), so that x's [1, 4 * chunk] slices get the weight tile's layout
        # (Triton sizes a load's per-thread vector by its elements per thread).
        # H200 sweep (benchmarks/quant_gemm.py --sweep): 8 channels x 2 warps was best
        # for N = 4096, 4 channels x 1 warp for N = 28672 (more programs in flight).
        wide = n >= 16384
        num_warps = cfg.num_warps or (1 if wide or not on_gpu else 2)
        block_n = cfg.block_n or ((4 if wide else 8) if on_gpu else 32)
        chunk = cfg.chunk or (32 * num_warps if on_gpu else 4)
        tiles_n = triton.cdiv(n, block_n)
        split = cfg.split_k or _choose_split(tiles_n * m, num_blocks, chunk, 2 * sms, 2)
    elif kernel == "gemm":
        block_m = cfg.block_m or (16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128)
        # H200 sweep: 16x64 (M <= 16), 64x128 (M <= 64), 128x256 with 8 warps (larger).
        block_n = cfg.block_n or (64 if m <= 16 or not on_gpu else 128 if m <= 64 else 256)
        chunk = cfg.chunk or 4
        if 4 * chunk < 16:
            raise ValueError(f"chunk must be >= 4 for the GEMM kernel, got {chunk}")
        num_warps = cfg.num_warps or (8 if block_m * block_n >= 128 * 128 else 4)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        split = cfg.split_k or _choose_split(tiles, num_blocks, chunk, sms, 4)
    else:
        raise ValueError(f"kernel must be 'gemv' or 'gemm', got {kernel!r}")
    steps = triton.cdiv(num_blocks, chunk)
    split = max(1, min(split, steps))
    blocks_per_split = triton.cdiv(steps, split) * chunk
    split = triton.cdiv(num_blocks, blocks_per_split)  # drop slices left empty by rounding
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    common = dict(
        BITS=packed.bits,
        BLOCK_N=block_n,
        CHUNK=chunk,
        PER_CHANNEL=packed.per_channel,
        HAS_BIAS=has_bias,
        SPLIT=split > 1,
        num_warps=num_warps,
        num_stages=cfg.num_stages or (1 if kernel == "gemv" else 2),
    )
    args = (x2, packed.qweight, packed.scales, packed.zeros, bias_arg, out, ws)
    if kernel == "gemv":
        _gemv_kernel[(tiles_n, m, split)](
            *args,
            n,
            num_blocks,
            blocks_per_split,
            group_blocks,
            x2.stride(0),
            out.stride(0),
            _MAGIC_1024,
            **common,
        )
    else:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
        _gemm_kernel[grid](
            *args,
            m,
            n,
            num_blocks,
            blocks_per_split,
            group_blocks,
            x2.stride(0),
            out.stride(0),
            _MAGIC_1024,
            BLOCK_M=block_m,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            **common,
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
    return out.reshape(*x.shape[:-1], n)


def legacy_layout(packed: PackedQuantWeight) -> PackedQuantWeight:
    """The same weight in this kernel's layout: words not rotated (the current layout
    stores them rotated left by ``WORD_ROTATION[bits]``)."""
    from dataclasses import replace

    from rtllm.kernels.quant_layout import WORD_ROTATION

    rot = WORD_ROTATION[packed.bits]
    w = packed.qweight.to(torch.int64) & 0xFFFFFFFF
    w = ((w >> rot) | (w << (32 - rot))) & 0xFFFFFFFF
    w = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)
    return replace(packed, qweight=w.contiguous())
