"""Which part of the model a rank holds (TensorRT-LLM's ``Mapping``).

Ranks are laid out TP-major inside a pipeline stage: ``rank = pp_rank * tp_size + tp_rank``,
so the ranks of one tensor-parallel group are adjacent (one NVLink island on a node) and
global rank 0 is tensor rank 0 of the first pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Mapping:
    """The parallel layout of a run and the position of one rank in it.

    Attributes:
        world_size: Number of ranks; must equal ``tp_size * pp_size``.
        rank: This rank, in ``[0, world_size)``.
        tp_size: Tensor-parallel degree (ranks sharing each layer).
        pp_size: Pipeline-parallel degree (stages of contiguous layers).
    """

    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        _check_int("world_size", self.world_size, 1)
        _check_int("tp_size", self.tp_size, 1)
        _check_int("pp_size", self.pp_size, 1)
        _check_int("rank", self.rank, 0)
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError(
                f"world_size ({self.world_size}) must equal tp_size * pp_size "
                f"({self.tp_size} * {self.pp_size} = {self.tp_size * self.pp_size})"
            )
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def tp_rank(self) -> int:
        """This rank's index inside its tensor-parallel group."""
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // self.tp_size

    @property
    def tp_group(self) -> list[int]:
        """Global ranks of this rank's tensor-parallel group (same stage)."""
        start = self.pp_rank * self.tp_size
        return list(range(start, start + self.tp_size))

    @property
    def pp_group(self) -> list[int]:
        """Global ranks of this rank's pipeline (same tensor rank, one per stage)."""
        return list(range(self.tp_rank, self.world_size, self.tp_size))

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_pp_rank(self) -> int:
        """Global rank of the same tensor rank in the previous stage."""
        if self.is_first_pp_rank:
            raise ValueError("the first pipeline stage has no previous stage")
        return self.rank - self.tp_size

    @property
    def next_pp_rank(self) -> int:
        """Global rank of the same tensor rank in the next stage."""
        if self.is_last_pp_rank:
            raise ValueError("the last pipeline stage has no next stage")
        return self.rank + self.tp_size

    def pp_layers(self, num_layers: int, pp_rank: int | None = None) -> range:
        """The contiguous layer range of a stage (this rank's by default).

        Layers are split as evenly as possible; the first ``num_layers % pp_size``
        stages take one layer more.
        """
        _check_int("num_layers", num_layers, 1)
        if num_layers < self.pp_size:
            raise ValueError(f"{num_layers} layers cannot be split over pp_size={self.pp_size} stages")
        stage = self.pp_rank if pp_rank is None else pp_rank
        if not 0 <= stage < self.pp_size:
            raise ValueError(f"pp_rank must be in [0, {self.pp_size}), got {stage}")
        base, extra = divmod(num_layers, self.pp_size)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    def with_rank(self, rank: int) -> Mapping:
        """The same layout seen from ``rank``."""
        return Mapping(self.world_size, rank, self.tp_size, self.pp_size)
