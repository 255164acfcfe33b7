"""Small-M (decode) weight-only quantized GEMV: ``out = x @ dequant(W)^T`` for M <= 8.

Layout and dequantization: :mod:`rtllm.kernels.quant_layout`. Batch-1 decode reads
every weight once, so the kernel must stream the int32 words at DRAM speed while
spending as few instructions per code as possible (an H200 issues about 33e12 thread
instructions/s and must consume 9.6e12 int4 codes/s at 4.8 TB/s). Per code it issues
one LOP3 (field + magic number, :func:`dequant_field`), one FFMA per row of ``x`` and
3/8 of a shift (int4; int8: 3/4); the zero point, the magic offset and the scale are
applied once per (channel, block of one thread's codes) on the float32 side, using

    sum_k (q_k - z) s x_k = s * (sum_k (off_k + q_k) x_k - sum_k off_k x_k - z sum_k x_k)

where ``off_k`` (1024 or 64) is the exact offset of the magic-number float, and the two
``x`` sums are per block and shared by every channel of the program.

Program tile: ``BLOCK_M`` rows of ``x`` x ``BLOCK_N`` output channels x ``NB`` blocks
of 4 words along K per step, held as ``[NB, BLOCK_M, BLOCK_N, 4]`` tensors: each
thread loads one block (16 contiguous bytes, one vector load) per channel and lanes
cover consecutive blocks, so a warp's load is 512 contiguous bytes of one channel's
row, and the thread's ``x`` values (its block's channels) serve all of its channels.
Loads of the next step are issued before the current step's arithmetic (register
double buffering; Triton does not pipeline loads that do not feed ``tl.dot``). The
only masks in the loop are on ``x`` (blocks past the slice read the last block and
meet ``x == 0``). Compiled for sm_90 (ptxas), the loop of the int4 g128 kernel with
``BLOCK_N = 8`` issues ~3.6 instructions per code (int4 per channel: ~3.0, int8 per
channel: ~3.4), against ~8.7 / 4.8 / 5.4 for the kernel it replaced.

Under PDL (:mod:`rtllm.kernels.pdl`) the first weight loads are issued before waiting
for the previous kernel: weights are constant, so they overlap its tail.

Split-K (grid axis 2, for shapes with too few channel tiles to fill the GPU): each
slice writes float32 partials; the last slice of a tile to arrive sums them, adds the
bias and writes the output, in the same launch (:mod:`rtllm.kernels.split_counters`).

Gated (an MLP's ``[gate; up]`` projection): a tile's channels are ``BLOCK_N / 2`` gate
rows and the matching up rows, so the epilogue writes ``silu(gate) * up`` and the
separate activation kernel (and the ``[M, 2 d]`` intermediate) is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers
from rtllm.kernels.quant_layout import (
    HIGH_PARITY,
    MAGIC_64,
    MAGIC_1024,
    PackedQuantWeight,
    dequant_field,
)
from rtllm.kernels.silu_and_mul import silu_mul
from rtllm.kernels.split_counters import MAX_SPLIT_TILES, split_counters

#: Largest ``BLOCK_M`` (rows of ``x`` per program); larger M loops over row tiles.
GEMV_MAX_BLOCK_M = 8


@dataclass(frozen=True)
class GemvConfig:
    """One GEMV launch (the tuner's candidates: :func:`rtllm.kernels.quant_tuning.candidates`).

    ``block_n`` channels and ``blocks`` 4-word blocks of K per program step (powers of
    two; on a GPU ``blocks = 32 * num_warps``, one block per thread: fewer leaves lanes
    duplicating work, small values are for the interpreter's tests), ``split_k`` K
    slices, ``num_warps``; ``prefetch``: steps of weight loads in flight ahead of the
    arithmetic (1 or 2; more bytes in flight per warp where too few warps share an SM
    to hide DRAM latency, at the cost of ``4 * block_n`` registers a thread).
    """

    block_n: int = 4
    blocks: int = 32
    split_k: int = 1
    num_warps: int = 1
    prefetch: int = 1


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    half_n,
    num_blocks,
    blocks_per_split,
    stride_xm,
    stride_om,
    mag_1024,
    mag_64,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,
    GROUP_BLOCKS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    GATED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_dependents(USE_PDL)
    FIELDS: tl.constexpr = 32 // BITS
    CH: tl.constexpr = 4 * FIELDS  # input channels per block
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    # Tensors are 4-D [NB, BLOCK_M, BLOCK_N, 4] (or broadcastable to it) so that they
    # share one blocked layout: 4 words (one block) per thread along the last axis,
    # lanes along the first (Triton orders the axes of equal contiguity by index).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATED:
        # A [gate; up] weight (N = 2 * half_n rows): the tile's first half are gate
        # rows, the second the matching up rows, so the epilogue can pair them.
        HALF: tl.constexpr = BLOCK_N // 2
        lane = tl.arange(0, BLOCK_N)
        col = pid_n * HALF + lane % HALF  # output column of each channel
        offs_n = tl.where(lane < HALF, col, half_n + col)
        n_ok = col < half_n
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    offs_b = tl.arange(0, NB)
    offs_c = tl.arange(0, 4)
    b4 = offs_b[:, None, None, None]
    m4 = offs_m[None, :, None, None]
    c4 = offs_c[None, None, None, :]
    # Channels past N read row N - 1 (valid memory, results never stored): no masks
    # on the weight loads' channel axis.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_ptrs = qw_ptr + rows[None, None, :, None] * (num_blocks * 4) + c4
    x_ptrs = x_ptr + tl.minimum(m4, M - 1).to(tl.int64) * stride_xm + b4 * CH + c4
    sz_rows = rows[None, None, :]  # [1, 1, BLOCK_N]: scale / zero column
    lo = pid_k * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, num_blocks)
    if PER_CHANNEL:
        # One scale and zero per channel: the per-word sums run over all of K and are
        # corrected once at the end (the offset's float32 cancellation then spans
        # K / (32 * NB) steps: ~1e-5 relative for int8, ~1e-4 for int4 at K = 14336,
        # below the 16-bit rounding of the output).
        acc4 = tl.zeros([NB, BLOCK_M, BLOCK_N, 4], dtype=tl.float32)
        sx_lo = tl.zeros([NB, BLOCK_M, 1, 4], dtype=tl.float32)
        sx_hi = tl.zeros([NB, BLOCK_M, 1, 4], dtype=tl.float32)
    else:
        acc = tl.zeros([NB, BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Blocks past hi load block num_blocks - 1 (valid memory, no masks: the words are
    # finite magic floats) and meet x == 0, so they add nothing.
    last = num_blocks - 1
    w_next = tl.load(w_ptrs + tl.minimum(lo + b4, last) * 4)
    if PREFETCH == 2:  # noqa: SIM108 (a constexpr branch: one side is compiled)
        w_after = tl.load(w_ptrs + tl.minimum(lo + NB + b4, last) * 4)
    else:
        w_after = w_next  # not used
    # The weights are constant: their first loads above overlap the previous kernel's
    # tail under PDL; x, the counters and the outputs wait for it.
    wait_for_producers(USE_PDL)
    for start in range(lo, hi, NB):
        w = w_next
        in_k = start + b4 < hi  # [NB, 1, 1, 1]: this lane's block exists
        if PREFETCH == 2:
            w_next = w_after
            w_after = tl.load(w_ptrs + tl.minimum(start + 2 * NB + b4, last) * 4)
        else:
            w_next = tl.load(w_ptrs + tl.minimum(start + NB + b4, last) * 4)
        # part: sum (off + q) x per word; sx_lo / sx_hi: sum of x over the fields at
        # offset 1024 / 64 (int8: all at 1024). Fields are unrolled.
        for j in tl.static_range(FIELDS):
            xj = tl.load(x_ptrs + start * CH + 4 * j, mask=in_k, other=0.0).to(tl.float32)
            fj = dequant_field(w, mag_1024, mag_64, j, BITS)
            if PER_CHANNEL:
                acc4 += fj * xj
            elif j == 0:
                part = fj * xj
            else:
                part += fj * xj
            # x sums of the offset-64 ("high") and offset-1024 fields
            # (quant_layout.dequant_field); groupwise: the first of each initialises.
            if BITS == 4 and j % 2 == HIGH_PARITY:
                if PER_CHANNEL or j >= 2:
                    sx_hi += xj
                else:
                    sx_hi = xj
            elif PER_CHANNEL or j >= 2 or (BITS == 8 and j >= 1):
                sx_lo += xj
            else:
                sx_lo = xj
        if not PER_CHANNEL:
            # Per (block, row, channel): a block's 4 words are one thread's, so these
            # sums stay in registers; one block lies in one group.
            p = tl.sum(part, axis=3)
            if BITS == 4:
                sxb = tl.sum(sx_lo + sx_hi, axis=3)
                oxb = tl.sum(1024.0 * sx_lo + 64.0 * sx_hi, axis=3)
            else:
                sxb = tl.sum(sx_lo, axis=3)
                oxb = 1024.0 * sxb
            # Blocks past hi read the last group (valid memory, finite values) and have
            # x == 0 and words == 0: p == oxb == sxb == 0, so they add nothing.
            blk = tl.minimum(start + offs_b, last)
            g = (blk // GROUP_BLOCKS)[:, None, None] * N + sz_rows
            s = tl.load(s_ptr + g).to(tl.float32)
            z = tl.load(z_ptr + g).to(tl.float32)
            acc += s * (p - oxb - z * sxb)
    if PER_CHANNEL:
        s = tl.load(s_ptr + sz_rows).to(tl.float32)
        z = tl.load(z_ptr + sz_rows).to(tl.float32)
        sxb = tl.sum(sx_lo + sx_hi, axis=3)
        oxb = tl.sum(1024.0 * sx_lo + 64.0 * sx_hi, axis=3)
        acc = s * (tl.sum(acc4, axis=3) - oxb - z * sxb)
    total = tl.sum(acc, axis=0)  # [BLOCK_M, BLOCK_N]
    m2 = offs_m[:, None]
    n2 = offs_n[None, :]
    out_mask = (m2 < M) & n_ok[None, :]
    if SPLIT:
        # Partials, then the last slice of this (row tile, channel tile) reduces them.
        tile = pid_m * tl.num_programs(0) + pid_n
        splits = tl.num_programs(2)
        ws = ws_ptr + m2.to(tl.int64) * N + n2
        tl.store(ws + pid_k.to(tl.int64) * M * N, total, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are stored before the count
        # acq_rel at GPU scope: our partials are visible before the count, and the last
        # arriver sees everyone's partials after it.
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(0, splits):
                total += tl.load(ws + k * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            _write_out(out_ptr, bias_ptr, total, offs_m, offs_n, n_ok, pid_n, M, half_n, stride_om,
                       BLOCK_N, HAS_BIAS, GATED)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        _write_out(out_ptr, bias_ptr, total, offs_m, offs_n, n_ok, pid_n, M, half_n, stride_om,
                   BLOCK_N, HAS_BIAS, GATED)


@triton.jit
def _write_out(out_ptr, bias_ptr, total, offs_m, offs_n, n_ok, pid_n, M, half_n, stride_om,
               BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    """Store ``total`` ``[BLOCK_M, BLOCK_N]`` (+ bias); gated: ``silu(gate) * up`` of the
    tile's channel pairs into ``BLOCK_N / 2`` output columns, from gate and up rounded
    to the output dtype first, so the result is bit for bit the separate
    ``silu_and_mul`` kernel's on the unfused output."""
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    m2 = offs_m[:, None]
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        pairs = tl.permute(tl.reshape(total, [total.shape[0], 2, HALF]), (0, 2, 1))
        gate, up = tl.split(pairs)
        gate = gate.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = silu_mul(gate, up)
        cols = (pid_n * HALF + tl.arange(0, HALF))[None, :]
        tl.store(out_ptr + m2.to(tl.int64) * stride_om + cols, y.to(out_ptr.dtype.element_ty),
                 mask=(m2 < M) & (cols < half_n))
    else:
        n2 = offs_n[None, :]
        tl.store(out_ptr + m2.to(tl.int64) * stride_om + n2, total.to(out_ptr.dtype.element_ty),
                 mask=(m2 < M) & n_ok[None, :])


def gemv_supported(m: int) -> bool:
    """Whether :func:`quant_gemv` takes ``m`` rows (larger M: the tiled GEMM)."""
    return 1 <= m <= GEMV_MAX_BLOCK_M


def quant_gemv(
    x2: torch.Tensor,
    packed: PackedQuantWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: GemvConfig,
    gated: bool = False,
) -> None:
    """Write ``x2 @ dequant(packed)^T + bias`` into ``out`` ``[M, N]`` (checked inputs:
    :func:`rtllm.kernels.quant_gemm.quant_linear` is the public entry point).

    ``x2`` is ``[M, K]`` with a contiguous last dim, ``M <= GEMV_MAX_BLOCK_M``. With
    ``gated``, ``packed`` is a ``[gate; up]`` weight of ``N = 2 d`` rows and ``out``
    ``[M, d]`` receives ``silu(gate) * up`` (the MLP's activation in the epilogue; a
    ``block_n`` of 1 runs as 2, one gate and one up channel).
    """
    m, k = x2.shape
    n = packed.out_features
    if gated and n % 2:
        raise ValueError(f"a gated GEMV needs an even number of rows, got {n}")
    if gated:
        cfg = replace(cfg, block_n=max(cfg.block_n, 2))
    if not gemv_supported(m):
        raise ValueError(f"the GEMV takes 1..{GEMV_MAX_BLOCK_M} rows, got {m}")
    if cfg.blocks < 1 or cfg.blocks & (cfg.blocks - 1):
        raise ValueError(f"GemvConfig.blocks must be a power of two, got {cfg.blocks}")
    if cfg.prefetch not in (1, 2):
        raise ValueError(f"GemvConfig.prefetch must be 1 or 2, got {cfg.prefetch}")
    if cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"GemvConfig.block_n must be a power of two, got {cfg.block_n}")
    fields = 32 // packed.bits
    num_blocks = k // (4 * fields)
    steps = triton.cdiv(num_blocks, cfg.blocks)
    split = max(1, min(cfg.split_k, steps))
    blocks_per_split = triton.cdiv(steps, split) * cfg.blocks
    split = triton.cdiv(num_blocks, blocks_per_split)  # no empty slices
    block_m = triton.next_power_of_2(m)
    pdl = use_pdl(x2.device)
    tiles_n = triton.cdiv(n, cfg.block_n)  # gated: d / (block_n / 2), the same count
    if split > 1:
        if tiles_n > MAX_SPLIT_TILES:
            raise ValueError(f"split-K GEMV needs <= {MAX_SPLIT_TILES} channel tiles, got {tiles_n}")
        ws = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
        cnt = split_counters(x2.device)
    else:
        ws = cnt = out  # unused
    _gemv_kernel[(tiles_n, 1, split)](
        x2,
        packed.qweight,
        packed.scales,
        packed.zeros,
        bias if bias is not None else out,
        out,
        ws,
        cnt,
        m,
        n,
        n // 2,
        num_blocks,
        blocks_per_split,
        x2.stride(0),
        out.stride(0),
        MAGIC_1024,
        MAGIC_64,
        BITS=packed.bits,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        NB=cfg.blocks,
        GROUP_BLOCKS=1 if packed.per_channel else packed.group_size // (4 * fields),
        PER_CHANNEL=packed.per_channel,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        PREFETCH=cfg.prefetch,
        GATED=gated,
        USE_PDL=pdl,
        num_warps=cfg.num_warps,
        num_stages=1,
        launch_pdl=pdl,
    )
