"""The process groups of a parallel run, and the collectives the model layers use.

One :class:`Mapping` per process is set by :func:`init_distributed` (or
:func:`set_mapping` for a single process). Layers read it through :func:`get_mapping`
when they are built, so model constructors keep their signatures; without
initialisation the mapping is ``Mapping()`` (tp=1, pp=1) and every helper here is a
no-op, so single-process code paths never touch ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from rtllm.distributed.mapping import Mapping

logger = logging.getLogger(__name__)

_MAPPING = Mapping()
_TP_GROUP: dist.ProcessGroup | None = None
_DEVICE = torch.device("cpu")

DEFAULT_TIMEOUT_S = 120.0


def get_mapping() -> Mapping:
    """This process's mapping (``Mapping()`` unless a parallel run was initialised)."""
    return _MAPPING


def set_mapping(mapping: Mapping) -> None:
    """Set the mapping without process groups (tests, or building one rank's shard)."""
    global _MAPPING
    _MAPPING = mapping


def comm_device() -> torch.device:
    """The device collectives run on: this rank's GPU with NCCL, the CPU with gloo."""
    return _DEVICE


def init_distributed(
    mapping: Mapping,
    device: torch.device,
    init_method: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Join the world's process group and create this rank's tensor-parallel group.

    ``device`` picks the backend (NCCL for CUDA, gloo for CPU); ``init_method`` is a
    ``tcp://host:port`` rendezvous. ``timeout_s`` bounds the rendezvous and every
    collective, so a peer that vanished makes the others fail instead of hanging.
    """
    global _TP_GROUP, _DEVICE
    if "://" not in init_method:
        raise ValueError(f"init_method must be a URL such as tcp://127.0.0.1:29500, got {init_method!r}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, world_size=mapping.world_size, rank=mapping.rank, timeout=timeout
    )
    # new_group is collective: every rank creates every TP group, in the same order.
    for stage in range(mapping.pp_size):
        ranks = list(range(stage * mapping.tp_size, (stage + 1) * mapping.tp_size))
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if mapping.rank in ranks:
            _TP_GROUP = group
    _DEVICE = device
    set_mapping(mapping)
    logger.info(
        "rank %d/%d joined (%s, tp_rank=%d, pp_rank=%d, pid %d)",
        mapping.rank, mapping.world_size, backend, mapping.tp_rank, mapping.pp_rank, os.getpid(),
    )


def destroy_distributed() -> None:
    """Leave the process groups (safe to call when none were created)."""
    global _TP_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP = None
    set_mapping(Mapping())


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (in place; a no-op at tp_size=1)."""
    if _MAPPING.tp_size == 1:
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate ``x`` of every tensor rank along ``dim``, in rank order (no-op at tp_size=1)."""
    if _MAPPING.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_MAPPING.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)


def send(x: torch.Tensor, dst: int) -> None:
    """Send a tensor to global rank ``dst`` (pipeline activations, logits)."""
    dist.send(x.contiguous(), dst)


def recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    """Receive a tensor of known ``shape`` and ``dtype`` from global rank ``src``."""
    out = torch.empty(shape, dtype=dtype, device=_DEVICE)
    dist.recv(out, src)
    return out


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``x`` from ``src`` to the whole world (in place)."""
    dist.broadcast(x, src)
    return x
