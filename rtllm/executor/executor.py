"""The executor interface between the LLM API (and the server) and an engine."""

from __future__ import annotations

from abc import ABC, abstractmethod

from rtllm.engine.engine import EngineLimits
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult


class GenerationExecutor(ABC):
    """Accepts requests, runs them on an engine and streams results back.

    Besides submitting, the server reads through this interface whether the engine is
    alive (``is_alive``, ``failure``), busy (``has_work``) and advancing
    (``last_step_time``), its load (:meth:`stats`) and its limits (:meth:`validate`),
    whether the engine runs in this process or in parallel workers.
    """

    @abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Validate and enqueue ``request``; raises ``ValueError`` for bad input."""

    @abstractmethod
    def abort(self, request_id: int) -> None:
        """Cancel a request; its result finishes with ``finish_reason == "cancelled"``."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine; requests still running finish as cancelled."""

    @property
    @abstractmethod
    def limits(self) -> EngineLimits:
        """The request limits of the engine."""

    @abstractmethod
    def validate(self, prompt_token_ids: list[int], max_tokens: int, beam_width: int = 1) -> None:
        """Raise ``ValueError`` if a request with this prompt can never run."""

    @property
    @abstractmethod
    def is_alive(self) -> bool:
        """True while the engine can run requests."""

    @property
    def failure(self) -> str | None:
        """Why the engine stopped, when it failed (e.g. a parallel worker died)."""
        return None

    @property
    @abstractmethod
    def has_work(self) -> bool:
        """True while requests are queued or running."""

    #: Monotonic time of the last completed engine step (health checks).
    last_step_time: float = 0.0

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """A snapshot of engine load (see :meth:`InProcessExecutor.stats`)."""

    def __enter__(self) -> GenerationExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
