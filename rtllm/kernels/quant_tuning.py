"""Launch configurations of the quantized linears and their tuner (see
:mod:`rtllm.kernels.quant_gemm` for the paths and when tuning runs).

Keys: ``(device, x dtype, M bucket, N, K, bits, group size, bias?)``. M buckets are
exact up to 4 and powers of two up to 1024 (the GEMV's ``BLOCK_M`` is a power of two),
so the engine's CUDA-graph batch sizes tune a handful of keys per layer shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from rtllm.kernels.graph_timing import graph_time_us, l2_overflow_copies
from rtllm.kernels.quant_gemv import GEMV_MAX_BLOCK_M
from rtllm.kernels.quant_gemv_mma import mma_gemv_supported
from rtllm.kernels.quant_layout import PackedQuantWeight

#: ``M`` up to which the GEMV kernel is a candidate (its FMAs per code grow with M;
#: the tensor-core GEMM's do not).
GEMV_MAX_M = GEMV_MAX_BLOCK_M
#: ``M`` from which dequantize-then-cuBLAS is a candidate. From first principles it
#: needs a compute-bound GEMM (M of a few hundred on an H200 at least) to amortise its
#: extra ~4 bytes of traffic per weight; the value stands until the benchmark
#: (``benchmarks/quant_gemm.py``, "dequant" column) shows where it wins.
DEQUANT_MIN_M = 1024
#: Calls per timed CUDA graph and graph replays per candidate (median taken).
TUNE_CALLS = 32
TUNE_TRIALS = 5
_TUNE = os.environ.get("RTLLM_QUANT_TUNE", "1") != "0"
#: ``RTLLM_QUANT_TUNE=all`` also tunes prefill sizes (``M > GEMV_MAX_M``) on first use.
_TUNE_ALL = os.environ.get("RTLLM_QUANT_TUNE", "1") == "all"
_tuned: dict[tuple, QuantGemmConfig] = {}
_timings: dict[tuple, list[tuple[QuantGemmConfig, float]]] = {}


@dataclass(frozen=True)
class QuantGemmConfig:
    """A launch configuration of :func:`quant_linear`; ``None`` fields use heuristics.

    ``kernel``: ``"gemv"``, ``"gemv_mma"``, ``"gemm"`` or ``"dequant"`` (default:
    tuned, see module docstring); ``chunk``: GEMM: 4-word blocks per K step
    (``4 * chunk >= 16``, the dot's K); GEMV: blocks per step (a power of two,
    ``32 * num_warps`` on a GPU: one per thread); tensor-core GEMV: blocks per pipeline
    step, with ``num_warps`` K slices per CTA and ``num_stages`` steps in flight;
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
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemm_split(tiles: int, num_blocks: int, chunk: int, num_sms: int) -> int:
    """K slices so that ``tiles * split`` reaches about one program per SM, each slice
    keeping at least 4 K steps (the partials cost a write and a read)."""
    if tiles >= num_sms:
        return 1
    steps = triton.cdiv(num_blocks, chunk)
    return max(1, min(triton.cdiv(num_sms, tiles), steps // 4))


#: ``(num_warps, chunk = blocks per step, num_stages)`` of the tensor-core int4 GEMV
#: (:mod:`rtllm.kernels.quant_gemv_mma`) the tuner times: the best four of an H200
#: sweep at Llama-3-8B shapes, M = 1 (benchmarks/RESULTS.md).
MMA_GEMV_TILES = ((8, 32, 2), (4, 16, 3), (8, 16, 3), (8, 8, 4))


def candidates(
    m: int, n: int, k: int, bits: int, num_sms: int, per_channel: bool = False, mma_gemv: bool = False
) -> list[QuantGemmConfig]:
    """Configurations the tuner times for an ``[m, k] x [n, k]`` product, the heuristic
    default first (the only one run untuned). ``mma_gemv``: the call qualifies for the
    CUDA tensor-core GEMV (:func:`rtllm.kernels.quant_gemv_mma.mma_gemv_supported`),
    whose configurations are added after the Triton ones."""
    out: list[QuantGemmConfig] = []
    if m <= GEMV_MAX_M:
        # GEMV (block_n, num_warps) by BLOCK_M: registers hold BLOCK_M * block_n * 4
        # float32 partial sums per thread; sm_90 compiles of these (ptxas, no GPU
        # needed) do not spill, except where left out (int4 groups with block_n = 16,
        # per-channel/int8 with BLOCK_M = 2 and block_n = 8).
        block_m = triton.next_power_of_2(m)
        grouped4 = bits == 4 and not per_channel
        tiles_by_m = {
            1: ((8, 1), (4, 1), (8 if grouped4 else 16, 1), (8, 2), (4, 4)),
            2: ((8, 1), (4, 1), (4, 2)) if grouped4 else ((4, 1), (2, 1), (4, 2)),
            4: ((4, 1), (2, 1), (4, 2)),
            8: ((2, 1), (1, 1), (2, 2)),
        }
        fields = 32 // bits
        gemv = []
        for block_n, warps in dict.fromkeys(tiles_by_m[block_m]):
            gemv.append(QuantGemmConfig("gemv", None, block_n, 32 * warps, 1, warps))
            # Bytes in flight: each warp has one step of loads outstanding (block_n x
            # 512 B), so N / block_n programs hold N x 512 B per warp-width whatever
            # block_n is: ~16 KB per SM at N = 4096, a quarter of what hides DRAM
            # latency. Split-K multiplies it; aim at ~8 warps per SM, >= 2 steps each.
            warps_total = triton.cdiv(n, block_n) * warps
            steps = triton.cdiv(k // (4 * fields), 32 * warps)
            split = min(triton.cdiv(8 * num_sms, warps_total), steps // 2)
            if split > 1:
                gemv.append(QuantGemmConfig("gemv", None, block_n, 32 * warps, split, warps))
        out += gemv
        if m == 1:
            # Batch 1 has the fewest warps per SM to hide DRAM latency: each tile again
            # with two steps of weight loads in flight (``num_stages`` is the GEMV's
            # prefetch depth).
            out += [dataclasses.replace(c, num_stages=2) for c in gemv]
        if mma_gemv:
            out += [QuantGemmConfig("gemv_mma", None, None, s, 1, w, st) for w, s, st in MMA_GEMV_TILES]
    if m > 1:
        # GEMM tiles (H200 sweeps of the previous kernel: 16x64 for M <= 16, 64x128 for
        # M <= 64, 128x256 with 8 warps beyond).
        if m <= 16:
            tiles = [(16, 64, 4), (16, 128, 4), (16, 32, 4)]
        elif m <= 64:
            bm = 32 if m <= 32 else 64
            tiles = [(bm, 128, 4), (bm, 64, 4), (bm, 128, 8)]
        else:
            tiles = [(128, 256, 8), (128, 128, 8), (64, 128, 4)]
        for bm, bn, warps in tiles:
            t = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            split = gemm_split(t, k // (128 // bits), 4, num_sms)
            out.append(QuantGemmConfig("gemm", bm, bn, 4, split, warps, 2))
    if m >= DEQUANT_MIN_M:
        out.append(QuantGemmConfig("dequant"))
    return out


def _m_bucket(m: int) -> int:
    return m if m <= 4 else triton.next_power_of_2(m) if m <= 1024 else 2048


def pick(
    x2: torch.Tensor,
    packed: PackedQuantWeight,
    bias: torch.Tensor | None,
    run: Callable[
        [torch.Tensor, PackedQuantWeight, torch.Tensor | None, torch.Tensor, QuantGemmConfig], None
    ],
) -> QuantGemmConfig:
    """The configuration for this call: cached, tuned now (timing ``run`` on each
    candidate), or the heuristic default (CPU, graph capture, ``RTLLM_QUANT_TUNE=0``)."""
    m, n, k = x2.shape[0], packed.out_features, packed.in_features
    on_gpu = x2.is_cuda
    sms = num_sms(x2.device.index or 0) if on_gpu else 4
    key = (x2.device, x2.dtype, _m_bucket(m), n, k, packed.bits, packed.group_size, bias is None)
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    mma = on_gpu and m <= GEMV_MAX_M and mma_gemv_supported(x2, packed)
    cands = candidates(m, n, k, packed.bits, sms, packed.per_channel, mma)
    if not on_gpu:
        return cands[0]
    if len(cands) == 1 or not _TUNE or torch.cuda.is_current_stream_capturing():
        return cands[0]  # untimed; not cached, so a later eager call still tunes
    if m > GEMV_MAX_M and not _TUNE_ALL:
        # Decode sizes are tuned by the warm-up forward before each CUDA graph capture
        # (at start-up); timing candidates on a prompt's first appearance stalled
        # serving (TTFT 23 ms -> 1.4 s measured), so prefill shapes take the default.
        return cands[0]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    copies = _weight_copies(packed, x2.device)
    reps = len(copies) * math.ceil(TUNE_CALLS / len(copies))
    times = []
    for c in cands:
        calls = [lambda c=c, p=p: run(x2, p, bias, out, c) for p in copies]
        try:
            t = graph_time_us(calls, reps, TUNE_TRIALS) / 1e3
        except Exception:  # noqa: BLE001 (a candidate that does not compile or launch)
            t = float("inf")
        times.append(t)
    del copies
    cfg = cands[min(range(len(cands)), key=times.__getitem__)]
    _tuned[key] = cfg
    _timings[key] = list(zip(cands, times, strict=True))
    return cfg


def _weight_copies(packed: PackedQuantWeight, device: torch.device) -> list[PackedQuantWeight]:
    """``packed`` and enough clones that cycling through them evicts each from L2 (as a
    decode step finds its weights); fewer if memory is short (timings then lean warm)."""
    copies = [packed]
    for _ in range(l2_overflow_copies(packed.nbytes, device) - 1):
        try:
            copies.append(packed.clone())
        except torch.cuda.OutOfMemoryError:
            break
    return copies


def tuned_configs() -> dict[tuple, QuantGemmConfig]:
    """The tuner's choices so far (the benchmark prints them)."""
    return dict(_tuned)


def tuning_timings() -> dict[tuple, list[tuple[QuantGemmConfig, float]]]:
    """Milliseconds per call of every candidate the tuner timed, by key."""
    return dict(_timings)
