"""Tensor and pipeline parallelism: :class:`Mapping` and the process groups of a run."""

from rtllm.distributed.mapping import Mapping

__all__ = ["Mapping"]
