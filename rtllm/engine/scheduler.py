"""Decides, each step, which requests run and how many tokens each computes.

Two stages, as in TensorRT-LLM:

* :class:`CapacityScheduler` admits waiting requests against the KV cache. Under
  ``GUARANTEED_NO_EVICT`` a request is admitted only if the blocks *to completion*
  (prompt + ``max_tokens``, capped by ``max_seq_len``) of every admitted request
  fit in the pool, so a running request can never run out of blocks.
* :class:`MicroBatchScheduler` picks this step's work among the admitted requests
  under ``max_batch_size`` and the ``max_num_tokens`` token budget: generation
  requests (one token each) first, then context requests, whole or, with chunked
  prefill, in budget-sized chunks.

Pure Python: no torch, no model. Tests drive it with fake requests.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.llm_request import LlmRequest, RequestState


@dataclass(slots=True)
class ScheduledRequest:
    """``request`` computes tokens ``[num_computed_tokens, + num_new_tokens)`` this step."""

    request: LlmRequest
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so it samples."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work."""

    scheduled: list[ScheduledRequest]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_context_requests(self) -> int:
        return sum(1 for s in self.scheduled if s.request.num_computed_tokens < s.request.num_prompt_tokens)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class CapacityScheduler:
    """Admission against the KV pool with the ``GUARANTEED_NO_EVICT`` policy."""

    def __init__(self, kv_cache: KVCacheManager, max_num_requests: int) -> None:
        self.kv_cache = kv_cache
        self.max_num_requests = max_num_requests

    def blocks_to_completion(self, request: LlmRequest) -> int:
        return self.kv_cache.num_blocks_for(request.max_total_tokens)

    def admit(self, running: list[LlmRequest], waiting: deque[LlmRequest]) -> list[LlmRequest]:
        """Move requests from the head of ``waiting`` while their worst case fits.

        Strict FIFO: a request that does not fit blocks those behind it, so a long
        request is never starved by a stream of short ones.
        """
        reserved = sum(self.blocks_to_completion(r) for r in running)
        admitted: list[LlmRequest] = []
        while waiting and len(running) + len(admitted) < self.max_num_requests:
            needed = self.blocks_to_completion(waiting[0])
            if reserved + needed > self.kv_cache.num_blocks:
                break
            reserved += needed
            request = waiting.popleft()
            request.state = RequestState.RUNNING
            admitted.append(request)
        return admitted


class MicroBatchScheduler:
    """Selects this step's tokens under the batch-size and token budgets."""

    def __init__(self, max_batch_size: int, max_num_tokens: int, enable_chunked_prefill: bool) -> None:
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.enable_chunked_prefill = enable_chunked_prefill

    def schedule(self, running: list[LlmRequest]) -> list[ScheduledRequest]:
        budget = self.max_num_tokens
        scheduled: list[ScheduledRequest] = []
        generation = [r for r in running if r.num_computed_tokens >= r.num_prompt_tokens]
        context = [r for r in running if r.num_computed_tokens < r.num_prompt_tokens]
        for request in generation:
            if request.num_tokens >= request.max_total_tokens:
                continue  # its last token is still on the device (overlap loop); nothing to compute
            if len(scheduled) >= self.max_batch_size or budget < 1:
                return scheduled
            scheduled.append(ScheduledRequest(request, request.num_tokens - request.num_computed_tokens))
            budget -= scheduled[-1].num_new_tokens
        for request in context:
            if len(scheduled) >= self.max_batch_size or budget < 1:
                break
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining <= budget:
                scheduled.append(ScheduledRequest(request, remaining))
                budget -= remaining
            elif self.enable_chunked_prefill:
                scheduled.append(ScheduledRequest(request, budget))
                budget = 0
        return scheduled


class Scheduler:
    """Owns the waiting queue and running set; composes capacity and micro-batch stages."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_batch_size: int,
        max_num_tokens: int,
        enable_chunked_prefill: bool = False,
    ) -> None:
        self.kv_cache = kv_cache
        self.capacity = CapacityScheduler(kv_cache, max_batch_size)
        self.micro_batch = MicroBatchScheduler(max_batch_size, max_num_tokens, enable_chunked_prefill)
        self.waiting: deque[LlmRequest] = deque()
        self.running: list[LlmRequest] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: LlmRequest) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Admit what fits, pick this step's tokens and allocate their KV blocks."""
        self.running.extend(self.capacity.admit(self.running, self.waiting))
        scheduled = self.micro_batch.schedule(self.running)
        for item in scheduled:
            request = item.request
            self.kv_cache.allocate(request, request.num_computed_tokens + item.num_new_tokens)
        return SchedulerOutput(scheduled)

    def remove(self, request: LlmRequest) -> None:
        """Drop a finished request and free its KV blocks (from any queue)."""
        if request in self.running:
            self.running.remove(request)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self.kv_cache.free(request.request_id)
