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

from rtllm.distributed import symm_all_reduce
from rtllm.distributed.mapping import Mapping
from rtllm.distributed.symm_all_reduce import SymmMemAllReduce

logger = logging.getLogger(__name__)

_MAPPING = Mapping()
_TP_GROUP: dist.ProcessGroup | None = None
# The control plane (step commands, schedules) always runs on gloo over CPU tensors, so
# a follower reads rank 0's command without synchronising its GPU (with NCCL the data
# plane, activations and token ids, stays on the GPUs).
_CONTROL_GROUP: dist.ProcessGroup | None = None
_DEVICE = torch.device("cpu")
# Sends still in flight (isend works with the tensors they keep alive), waited for by
# wait_sends() at the end of every step.
_PENDING_SENDS: list[tuple[dist.Work, torch.Tensor]] = []
# Small all-reduces of a CUDA tensor-parallel group (None: NCCL for everything).
_SMALL_ALL_REDUCE: SymmMemAllReduce | None = None

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


def rank_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The device of a rank: CPU when ``requested`` is ``"cpu"`` (or no GPU is there),
    else GPU ``local_rank`` modulo the visible GPUs (a launcher that shows each task
    one GPU, e.g. ``srun --gpus-per-task 1``, makes it device 0)."""
    want_cuda = requested is None and torch.cuda.is_available() or (requested or "").startswith("cuda")
    if not want_cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


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
    global _TP_GROUP, _CONTROL_GROUP, _DEVICE, _SMALL_ALL_REDUCE
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
    _CONTROL_GROUP = dist.new_group(timeout=timeout, backend="gloo") if backend != "gloo" else None
    _DEVICE = device
    set_mapping(mapping)
    if mapping.tp_size > 1:
        _SMALL_ALL_REDUCE = symm_all_reduce.create(_TP_GROUP, device)
    logger.info(
        "rank %d/%d joined (%s, tp_rank=%d, pp_rank=%d, pid %d)",
        mapping.rank, mapping.world_size, backend, mapping.tp_rank, mapping.pp_rank, os.getpid(),
    )


def destroy_distributed() -> None:
    """Leave the process groups (safe to call when none were created)."""
    global _TP_GROUP, _CONTROL_GROUP, _SMALL_ALL_REDUCE
    _SMALL_ALL_REDUCE = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP = _CONTROL_GROUP = None
    _PENDING_SENDS.clear()
    set_mapping(Mapping())


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (a no-op at tp_size=1); use the returned
    tensor (small CUDA tensors are reduced out of place, through symmetric memory)."""
    if _MAPPING.tp_size == 1:
        return x
    if _SMALL_ALL_REDUCE is not None and _SMALL_ALL_REDUCE.handles(x):
        return _SMALL_ALL_REDUCE(x)
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``x`` over the tensor-parallel group, in place (a no-op at
    tp_size=1)."""
    if _MAPPING.tp_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate ``x`` of every tensor rank along ``dim``, in rank order (no-op at tp_size=1)."""
    if _MAPPING.tp_size == 1:
        return x
    dim = dim % x.dim()
    # One collective into one buffer (graph-capturable), then ranks moved next to dim.
    x = x.contiguous()
    out = x.new_empty((_MAPPING.tp_size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=_TP_GROUP)
    return out.view(_MAPPING.tp_size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


def send(x: torch.Tensor, dst: int) -> None:
    """Send a tensor to global rank ``dst`` without waiting (pipeline activations,
    logits); the send completes by :func:`wait_sends`. Non-blocking so a stage goes on
    to its next micro-batch while the previous one travels."""
    x = x.contiguous()
    _PENDING_SENDS.append((dist.isend(x, dst), x))


def wait_sends() -> None:
    """Wait for every send started by :func:`send` (end of a step)."""
    while _PENDING_SENDS:
        work, _ = _PENDING_SENDS.pop(0)
        work.wait()


def recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    """Receive a tensor of known ``shape`` and ``dtype`` from global rank ``src``."""
    out = torch.empty(shape, dtype=dtype, device=_DEVICE)
    dist.recv(out, src)
    return out


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``x`` from ``src`` to the whole world (in place; data plane)."""
    dist.broadcast(x, src)
    return x


def control_broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast a CPU tensor from ``src`` over the control plane (gloo), in place."""
    dist.broadcast(x, src, group=_CONTROL_GROUP)
    return x
