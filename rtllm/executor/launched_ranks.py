"""Runs started by a launcher (``torchrun``, SLURM's ``srun``): every process is one rank.

On one node, ``LLM(tensor_parallel_size=..., pipeline_parallel_size=...)`` spawns its
own workers (:mod:`rtllm.executor.mp_executor`). Across nodes a launcher starts one
process per GPU instead, each running the same command; the rendezvous comes from the
standard environment variables:

* ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` (with ``MASTER_ADDR`` and
  ``MASTER_PORT`` exported by the batch script).

Rank 0 runs the engine in its own process (an :class:`InProcessExecutor` over a
:class:`~rtllm.distributed.dist_runner.DistributedRunner`), so the command it runs
(``rtllm serve``, ``rtllm generate``, ``rtllm bench``, a user script) behaves as on one
GPU. On every other rank ``LLM(...)`` does not return: the rank follows rank 0's steps
until rank 0 shuts down, then the process exits with status 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from rtllm.distributed import parallel_state as ps
from rtllm.distributed.mapping import Mapping
from rtllm.executor.inproc_executor import InProcessExecutor

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LaunchedRank:
    """Where this process sits in a launcher-started world."""

    rank: int
    world_size: int
    local_rank: int


def launched_rank() -> LaunchedRank | None:
    """This process's rank when a launcher started it (see the module docstring), else None."""
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and world in env:
            return LaunchedRank(int(env[rank]), int(env[world]), int(env.get(local, "0")))
    return None


class RankZeroExecutor(InProcessExecutor):
    """Rank 0's engine over a launcher-started world: alive while the world is, and its
    shutdown releases the other ranks."""

    def __init__(self, runner: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner

    @property
    def is_alive(self) -> bool:
        return super().is_alive and self.runner.broken is None

    @property
    def failure(self) -> str | None:
        broken = self.runner.broken
        return None if broken is None else f"a collective with the other ranks failed: {broken}"

    def shutdown(self) -> None:
        super().shutdown()
        self.runner.shutdown_followers()
        ps.destroy_distributed()


def join_world(args: Any, launched: LaunchedRank, collective_timeout_s: float = ps.DEFAULT_TIMEOUT_S) -> Any:
    """Join the launcher's world and build this rank's engine.

    Returns rank 0's :class:`~rtllm.llmapi.build.BuiltEngine`; on other ranks follows
    rank 0 and exits the process when it shuts down.
    """
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if launched.world_size != tp * pp:
        raise ValueError(
            f"the launcher started {launched.world_size} processes, but tensor_parallel_size * "
            f"pipeline_parallel_size = {tp} * {pp} = {tp * pp}; start exactly that many"
        )
    mapping = Mapping(launched.world_size, launched.rank, tp, pp)
    device = ps.rank_device(args.device, launched.local_rank)
    ps.init_distributed(mapping, device, "env://", collective_timeout_s)
    from rtllm.llmapi.build import build_engine

    built = build_engine(args, device)
    runner = built.engine.runner
    if launched.rank == 0:
        runner.start_heartbeat()
        return built
    try:
        runner.follow()
    finally:
        ps.destroy_distributed()
    logger.info("rank %d: rank 0 shut down; exiting", launched.rank)
    raise SystemExit(0)
