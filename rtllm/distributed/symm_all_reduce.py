"""Low-latency all-reduce of small tensors over NVLink with PyTorch symmetric memory.

Decode steps all-reduce a few KiB twice per layer; NCCL's fixed cost per call dominates
there. Every rank of the tensor-parallel group holds one symmetric buffer (mapped into
its peers' address spaces); ``one_shot_all_reduce_copy`` copies the local input into it
and each rank sums all peers' buffers directly (one kernel, one barrier, graph
capturable). Larger tensors (prefill) stay on NCCL.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Largest tensor (bytes) reduced through symmetric memory; NCCL above it.
MAX_BYTES = 1 << 20
#: Set to "nccl" to reduce everything with NCCL.
ENV_SWITCH = "RTLLM_ALL_REDUCE"
_DTYPES = (torch.bfloat16, torch.float32)


class SymmMemAllReduce:
    """Sums small CUDA tensors over ``group`` through one symmetric buffer."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def handles(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.is_cuda and x.dtype in _DTYPES and x.is_contiguous() and 0 < nbytes <= self.max_bytes and nbytes % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer.view(x.dtype)[: x.numel()]
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x.view(-1), "sum", self.group_name)
        return out.view_as(x)


def create(group: dist.ProcessGroup, device: torch.device) -> SymmMemAllReduce | None:
    """A :class:`SymmMemAllReduce` for a CUDA tensor-parallel group, or None (NCCL only)
    when it is switched off or symmetric memory is unavailable here."""
    if device.type != "cuda" or os.environ.get(ENV_SWITCH, "").lower() == "nccl":
        return None
    try:
        reducer = SymmMemAllReduce(group, device)
        probe = torch.ones(8, dtype=torch.float32, device=device)
        total = float(reducer(probe)[0])  # every rank takes part, like any collective
        if total != dist.get_world_size(group):
            raise RuntimeError(f"probe all-reduce gave {total}")
    except Exception:  # noqa: BLE001 - fall back to NCCL, saying why
        logger.warning("symmetric-memory all-reduce unavailable; small all-reduces use NCCL", exc_info=True)
        return None
    logger.info("small all-reduces (<= %d KiB) use symmetric memory", MAX_BYTES >> 10)
    return reducer
