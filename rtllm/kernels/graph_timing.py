"""Timing short kernels as a decode step runs them: back to back in a CUDA graph, with
their weights cold in L2.

A memory-bound kernel of ~10 us cannot be timed one call at a time: a CUDA event pair
around one launch measures the host's launch latency as much as the kernel (a Triton
launch takes tens of microseconds of Python), and a weight small enough to stay in L2
reads at L2 speed on every repeat. Both biased the quantized-GEMV tuner (its picks
differed between calls by up to 2x in kernel time). :func:`graph_time_us` instead
replays a graph of many calls that cycle through :func:`l2_overflow_copies` copies of
the weight, so each call reads its weight from DRAM, and divides by the count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch

#: Copies of a weight cycled through: their bytes reach this many times the L2 size.
L2_OVERFLOW_FACTOR = 3
#: Upper bound on the copies (small weights would otherwise need hundreds).
MAX_COPIES = 48


def l2_overflow_copies(nbytes: int, device: torch.device, max_copies: int = MAX_COPIES) -> int:
    """How many copies of an ``nbytes`` weight to cycle through so that each call finds
    its weight evicted from ``device``'s L2 (1 on a device without an L2 size)."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(max_copies, math.ceil(L2_OVERFLOW_FACTOR * l2 / max(nbytes, 1))))


def graph_time_us(calls: Sequence[Callable[[], object]], reps: int, trials: int) -> float:
    """Median microseconds per call of a CUDA graph of ``reps`` calls cycling through
    ``calls`` (one per weight copy), over ``trials`` replays.

    Each call runs once eagerly first (compilation, and any error surfaces here rather
    than inside the capture). Must not be called while a graph is being captured.
    """
    if not calls or reps < 1 or trials < 1:
        raise ValueError(
            f"need calls, reps >= 1 and trials >= 1, got {len(calls)}, {reps}, {trials}"
        )
    for call in calls:
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up on the capture stream, as torch.cuda.graphs advises
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return statistics.median(times)
