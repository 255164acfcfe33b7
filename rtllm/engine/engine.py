"""The engine loop body: one :meth:`Engine.step` schedules, runs, samples and updates.

Errors never kill the loop: if a step's forward pass fails, every request of
the step is retried alone, so only the request that really fails gets an error;
finished, aborted and failed requests always give their KV blocks back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.llm_request import FinishReason, LlmRequest
from rtllm.engine.sampler import Sampler
from rtllm.engine.scheduler import ScheduledRequest, Scheduler
from rtllm.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestUpdate:
    """What one step produced for one request."""

    request_id: int
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Request limits checked at submission."""

    max_seq_len: int
    max_num_tokens: int
    vocab_size: int
    enable_chunked_prefill: bool


class Engine:
    """Inflight batching over a :class:`Scheduler`, a :class:`ModelRunner` and a :class:`Sampler`."""

    def __init__(
        self,
        runner: ModelRunner,
        kv_cache: KVCacheManager,
        scheduler: Scheduler,
        sampler: Sampler,
        limits: EngineLimits,
    ) -> None:
        self.runner = runner
        self.kv_cache = kv_cache
        self.scheduler = scheduler
        self.sampler = sampler
        self.limits = limits
        self.requests: dict[int, LlmRequest] = {}
        self.num_steps = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def validate(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """Raise ``ValueError`` if a request with this prompt can never run."""
        limits = self.limits
        num = len(prompt_token_ids)
        if num == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {limits.vocab_size}); got {bad[:5]}")
        if num > limits.max_seq_len:
            raise ValueError(f"prompt has {num} tokens, more than max_seq_len={limits.max_seq_len}")
        if num + max_tokens > limits.max_seq_len:
            raise ValueError(
                f"prompt ({num} tokens) + max_tokens ({max_tokens}) exceeds max_seq_len="
                f"{limits.max_seq_len}; lower max_tokens to at most {limits.max_seq_len - num}"
            )
        if num > limits.max_num_tokens and not limits.enable_chunked_prefill:
            raise ValueError(
                f"prompt has {num} tokens, more than max_num_tokens={limits.max_num_tokens}; "
                "raise max_num_tokens or set enable_chunked_prefill=True"
            )

    def add_request(self, request: LlmRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id} is already in the engine")
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def finish_request(self, request_id: int, reason: FinishReason, error: str | None = None) -> bool:
        """End a request now (abort, stop string, error); frees its blocks.

        Returns False when the request is not (or no longer) in the engine.
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        request.finish(reason, error)
        self.scheduler.remove(request)
        return True

    def step(self) -> list[RequestUpdate]:
        """Run one iteration; returns an update for every request that produced
        tokens or finished."""
        output = self.scheduler.schedule()
        if not output:
            return []
        self.num_steps += 1
        updates: list[RequestUpdate] = []
        tokens = self._forward_and_sample(output.scheduled, updates)
        for item in output.scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
        for item, token in tokens:
            updates.append(self._append_token(item.request, token))
        return updates

    def _forward_and_sample(
        self, scheduled: list[ScheduledRequest], updates: list[RequestUpdate]
    ) -> list[tuple[ScheduledRequest, int]]:
        try:
            return self._run(scheduled)
        except Exception as exc:  # noqa: BLE001 - the loop must survive any request
            if len(scheduled) == 1:
                self._fail(scheduled[0].request, exc, updates)
                scheduled.clear()
                return []
            logger.warning("step failed (%s); retrying its %d requests one by one", exc, len(scheduled))
        results: list[tuple[ScheduledRequest, int]] = []
        survivors: list[ScheduledRequest] = []
        for item in scheduled:
            try:
                results.extend(self._run([item]))
                survivors.append(item)
            except Exception as exc:  # noqa: BLE001
                self._fail(item.request, exc, updates)
        scheduled[:] = survivors
        return results

    def _run(self, scheduled: list[ScheduledRequest]) -> list[tuple[ScheduledRequest, int]]:
        logits = self.runner.execute(scheduled, self.kv_cache.block_table)
        sampling = [item for item in scheduled if item.samples]
        if not sampling:
            return []
        tokens = self.sampler.sample(logits, [item.request for item in sampling])
        return list(zip(sampling, tokens, strict=True))

    def _fail(self, request: LlmRequest, exc: BaseException, updates: list[RequestUpdate]) -> None:
        logger.error("request %d failed: %r", request.request_id, exc)
        message = f"{type(exc).__name__}: {exc}"
        self.finish_request(request.request_id, FinishReason.ERROR, message)
        updates.append(RequestUpdate(request.request_id, [], True, FinishReason.ERROR, message))

    def _append_token(self, request: LlmRequest, token: int) -> RequestUpdate:
        request.output_token_ids.append(token)
        sampling = request.sampling
        reason: FinishReason | None = None
        if token in sampling.stop_token_ids or (not sampling.ignore_eos and token in sampling.end_ids):
            reason = FinishReason.STOP
        elif len(request.output_token_ids) >= sampling.max_tokens or request.num_tokens >= request.max_seq_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.finish_request(request.request_id, reason)
        return RequestUpdate(request.request_id, [token], reason is not None, reason)

    def shutdown(self) -> None:
        """Finish every request as cancelled and free all blocks."""
        for request_id in list(self.requests):
            self.finish_request(request_id, FinishReason.CANCELLED)
