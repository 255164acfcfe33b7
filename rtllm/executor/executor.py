"""The executor interface between the LLM API and an engine."""

from __future__ import annotations

from abc import ABC, abstractmethod

from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult


class GenerationExecutor(ABC):
    """Accepts requests, runs them on an engine and streams results back."""

    @abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Validate and enqueue ``request``; raises ``ValueError`` for bad input."""

    @abstractmethod
    def abort(self, request_id: int) -> None:
        """Cancel a request; its result finishes with ``finish_reason == "cancelled"``."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine; requests still running finish as cancelled."""

    def __enter__(self) -> GenerationExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
