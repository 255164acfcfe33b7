"""Int4 GEMV on tensor cores for decode (M <= 8), in CUDA C++ (``cuda/int4_gemv_mma.cu``).

Why not Triton: at batch 1 the int4 GEMV must dequantize ~10e12 codes/s on an H200
(4.8 TB/s), so instructions per code decide its speed. The Triton GEMV
(:mod:`rtllm.kernels.quant_gemv`) issues ~3.7 per code (float32 FMAs, one per code) and
ptxas schedules its register-double-buffered weight loads so late that half its stall
samples wait on them. This kernel issues ~2 per code and keeps its loads in flight in
shared memory:

* **Tensor cores, weights as the A operand.** A warp owns 16 weight rows and a K slice.
  Per 4-word block (32 channels) lane ``(g, q) = (lane / 4, lane % 4)`` takes word ``q``
  of rows ``g`` and ``g + 8``: each word gives four 16-bit pairs ``(f_p, f_p+4)`` (one
  shift and one LOP3 per pair, the magic-number trick of
  :mod:`rtllm.kernels.quant_layout` in 16 bits: ``MAGIC + 2 q``, exact), which are
  exactly the A fragments of two ``mma.m16n8k16`` (a row's pair at k = 2q, 2q+1, the
  next at k = 2q+8, 2q+9). The order of the K sum is free, so the B fragments (x) are
  gathered to match: ``(x[q], x[16+q])``, ``(x[4+q], x[20+q])``, ... The 8 B columns
  carry up to 8 rows of ``x``: M = 1..8 costs the same instructions.
* **Zero point and offset on the float32 side**: the MMA sums ``(MAGIC + 2q) x``; per
  quantization group the kernel subtracts ``(MAGIC + 2z) * sum(x)`` and multiplies by
  ``s / 2`` (the x sums per group are computed once per warp). Bit patterns and
  products are exact; float32 cancellation costs ~1e-6 relative.
* **x permuted once per warp** into shared memory in fragment order (one 16-byte load
  per lane per block in the loop), with its per-group sums.
* **Weights through** ``cp.async`` (``STAGES`` steps of ``STEP_BLOCKS`` blocks in flight
  per warp, scales and zeros copied with them): loads that write no register cannot
  be sunk by ptxas towards their use, the failure mode of the Triton kernel.
* **Persistent CTAs**: as many as fit on the GPU at once, each taking every
  ``grid``-th tile of 16 rows, so x is permuted once per CTA and the copy pipeline
  runs on from one tile into the next.
* **K split over a CTA's warps**, reduced through shared memory; the epilogue adds the
  bias and, for a ``[gate; up]`` weight (``gated``), writes ``silu(gate) * up`` (gate
  and up rounded to the output dtype first, as the separate activation kernel does).
* **PDL** (:mod:`rtllm.kernels.pdl`): the first step's weight copies are issued before
  waiting for the previous kernel, each lane's first block of x right after it, and
  the remaining prologue steps only then: requests queue up on the SM in issue order,
  so x (on the critical path) waits behind one step, not all of them. On an H200 one
  early step made the batch-1 decode step 1.7 % faster than ``STAGES - 1``
  (``EARLY_STEPS`` in the source).

Scope: int4, group size a power-of-two multiple of 32 or per channel, 16-bit ``x`` and
scales, ``N % 16 == 0`` (gated: ``N / 2 % 8 == 0``), CUDA compute capability 8.0+ and
NVRTC present (:mod:`rtllm.kernels.cuda_jit`); :func:`mma_gemv_supported` says when.
The tuner (:mod:`rtllm.kernels.quant_tuning`) times it against the Triton kernels.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from rtllm.kernels import cuda_jit
from rtllm.kernels.pdl import use_pdl
from rtllm.kernels.quant_layout import PackedQuantWeight

_SOURCE = "int4_gemv_mma.cu"
_MAX_M = 8
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MmaGemvConfig:
    """``warps`` per CTA (K slices of its 16 rows), ``step_blocks`` 4-word blocks per
    pipeline step (4, 8, 16 or 32: a copy round of 32 lanes then covers whole rows),
    ``stages`` steps in flight (>= 2)."""

    warps: int = 8
    step_blocks: int = 8
    stages: int = 4


def mma_gemv_supported(x2: torch.Tensor, packed: PackedQuantWeight, gated: bool = False) -> bool:
    """Whether :func:`mma_gemv` takes this call (else the Triton kernels run)."""
    if not (x2.is_cuda and cuda_jit.available()):
        return False
    if torch.cuda.get_device_capability(x2.device)[0] < 8:
        return False
    m, n = x2.shape[0], packed.out_features
    group_blocks = packed.group_size // 32
    return (
        packed.bits == 4
        and 1 <= m <= _MAX_M
        and x2.dtype in _HALF
        and packed.scales.dtype in _HALF
        and packed.zeros.dtype == packed.scales.dtype
        and (n % 16 == 0 if not gated else n % 2 == 0 and (n // 2) % 8 == 0)
        and (packed.per_channel or (packed.group_size % 32 == 0 and group_blocks & (group_blocks - 1) == 0))
        and x2.stride(-1) == 1
        and x2.stride(0) % 8 == 0
        and x2.data_ptr() % 16 == 0
        and packed.qweight.is_contiguous()
    )


def _layout(k: int, m: int, group_blocks: int, cfg: MmaGemvConfig) -> tuple[int, int, int]:
    """``(blocks per warp, warps used, dynamic shared memory bytes)`` of a launch."""
    num_blocks = k // 32
    unit = cfg.step_blocks if group_blocks == 0 else math.lcm(cfg.step_blocks, group_blocks)
    per_warp = math.ceil(math.ceil(num_blocks / cfg.warps) / unit) * unit
    warps = math.ceil(num_blocks / per_warp)
    groups_per_step = 1 if group_blocks == 0 or group_blocks >= cfg.step_blocks else cfg.step_blocks // group_blocks
    stage_words = 16 * (4 * cfg.step_blocks + 4) + 16 * groups_per_step
    intervals = 1 if group_blocks == 0 else per_warp // group_blocks
    warp_words = cfg.stages * stage_words + m * per_warp * 16 + per_warp * 8 + intervals * 8
    reduction_words = 2 * warps * 128  # two buffers of [warp][lane][4] float32
    return per_warp, warps, 4 * (warps * warp_words + reduction_words)


def mma_gemv(
    x2: torch.Tensor,
    packed: PackedQuantWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: MmaGemvConfig,
    gated: bool = False,
) -> None:
    """Write ``x2 @ dequant(packed)^T + bias`` (gated: ``silu(gate) * up`` of the
    ``[gate; up]`` weight's halves) into ``out`` ``[M, N]`` (gated: ``[M, N / 2]``).

    Raises:
        ValueError: if :func:`mma_gemv_supported` is false or ``cfg`` is invalid.
    """
    if not mma_gemv_supported(x2, packed, gated):
        raise ValueError("mma_gemv does not take this call (see mma_gemv_supported)")
    if cfg.step_blocks not in (4, 8, 16, 32):
        raise ValueError(f"MmaGemvConfig.step_blocks must be 4, 8, 16 or 32, got {cfg.step_blocks}")
    if cfg.stages < 2 or cfg.warps < 1:
        raise ValueError(f"MmaGemvConfig needs stages >= 2 and warps >= 1, got {cfg}")
    m, k = x2.shape
    n = packed.out_features
    if bias is not None and bias.dtype != x2.dtype:
        bias = bias.to(x2.dtype)  # the kernel reads bias as x's 16-bit type
    if out.dtype != x2.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {x2.dtype} with a contiguous last dim, got {out.dtype}")
    group_blocks = 0 if packed.per_channel else packed.group_size // 32
    per_warp, warps, smem = _layout(k, m, group_blocks, cfg)
    defines = (
        ("GATED", int(gated)),
        ("GROUP_BLOCKS", group_blocks),
        ("HAS_BIAS", int(bias is not None)),
        ("IS_BF16", int(x2.dtype == torch.bfloat16)),
        ("SCALE_BF16", int(packed.scales.dtype == torch.bfloat16)),
        ("STAGES", cfg.stages),
        ("STEP_BLOCKS", cfg.step_blocks),
    )
    device = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit is not None and smem > limit:
        raise ValueError(
            f"{cfg} needs {smem} bytes of shared memory per CTA at K={k}, M={m}; this GPU allows "
            f"{limit} (fewer warps, blocks per step or stages fit)"
        )
    kernel = cuda_jit.load_kernel(_SOURCE, "int4_gemv_mma", defines, device)
    ptr = ctypes.c_void_p
    args = [
        ptr(packed.qweight.data_ptr()),
        ptr(packed.scales.data_ptr()),
        ptr(packed.zeros.data_ptr()),
        ptr(x2.data_ptr()),
        ptr((bias if bias is not None else out).data_ptr()),
        ptr(out.data_ptr()),
        ctypes.c_int(m),
        ctypes.c_int(n),
        ctypes.c_int(k),
        ctypes.c_int(x2.stride(0)),
        ctypes.c_int(out.stride(0)),
        ctypes.c_int(per_warp),
    ]
    # Persistent CTAs: as many as fit at once.
    tiles = n // 16
    resident = kernel.blocks_per_sm(32 * warps, smem) * props.multi_processor_count
    # Every SM holds the same number of CTAs (grid = resident): tile counts then differ
    # by at most one between CTAs, where equal tiles per CTA left some SMs one CTA short.
    grid = min(tiles, max(1, resident))
    kernel.launch((grid, 1, 1), (32 * warps, 1, 1), smem, args, pdl=use_pdl(x2.device))
