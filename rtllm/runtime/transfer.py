"""Host-to-device copies that never make the host wait for the device.

A copy from pageable host memory synchronises with the stream, which would stall
the overlap loop; staging through pinned memory (cached by torch's host
allocator, which keeps a block until its copy has completed) keeps it async.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(data)`` on ``device``, copied asynchronously on CUDA."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
