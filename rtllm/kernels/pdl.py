"""Programmatic dependent launch (PDL) between consecutive Triton kernels (sm_90+).

A decode step at batch 1 is a chain of ~350 short kernels; without PDL each one
starts only after its predecessor has drained, so every kernel pays its launch and
first DRAM round trip on the critical path. With PDL (``launch_pdl=True``) a kernel
may be scheduled while its predecessor still runs, and synchronises inside:

* :func:`wait_for_producers` (``griddepcontrol.wait``) blocks until every grid the
  kernel depends on has completed and its writes are visible. Everything before it
  may only read memory no earlier kernel of the step writes (the quantized GEMV
  prefetches its weights there);
* :func:`allow_dependents` (``griddepcontrol.launch_dependents``) lets the next
  PDL-launched kernel be scheduled once every program of this one has called it (or
  exited).

Invariant that keeps chains safe: every program of a PDL kernel calls
:func:`wait_for_producers` before it reads or writes activations, unconditionally. A
kernel then cannot complete before its predecessor did, so waiting on the immediate
predecessor orders it after all earlier ones too. Kernels launched without PDL (cuBLAS,
PyTorch ops) wait for their predecessor to finish as always.

CUDA graphs record PDL launches as programmatic edges, so captured decode steps keep
the overlap. ``RTLLM_PDL=0`` turns PDL off (for A/B timing); the Triton CPU interpreter
never uses it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: CUDA, compute capability 9.0 or
    newer, and ``RTLLM_PDL`` not set to ``0``."""
    if device.type != "cuda" or os.environ.get("RTLLM_PDL", "1") == "0":
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_producers(USE_PDL: tl.constexpr):
    """Block until the kernels this one depends on have completed (a no-op without PDL)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def allow_dependents(USE_PDL: tl.constexpr):
    """Let the next PDL-launched kernel be scheduled (a no-op without PDL)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
