"""Arrival counters of single-launch split reductions (split-K GEMV, split-KV decode
attention).

A kernel split over ``S`` programs per output tile writes float32 partials, then
each program bumps its tile's counter (``atomic_add``, acq_rel at GPU scope); the
program that sees ``S - 1`` is the last, sums the partials in a fixed order
(deterministic) and resets the counter to 0. So one launch does the whole reduction,
and the buffer is all zeros between launches.

Invariant: launches using one device's buffer are serialized on one stream (true for
the engine's forward, eager or in a CUDA graph), so no two launches share a counter at
the same time.
"""

from __future__ import annotations

import torch

#: Counters per device: the most output tiles one split launch may have.
MAX_SPLIT_TILES = 1 << 16
_buffers: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed int32 counters (allocated once; the kernels reset them)."""
    device = torch.device(device)
    buf = _buffers.get(device)
    if buf is None:
        buf = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
        _buffers[device] = buf
    return buf
