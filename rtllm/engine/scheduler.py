"""Decides, each step, which requests run and how many tokens each computes.

Two stages, as in TensorRT-LLM:

* :class:`rtllm.engine.capacity_scheduler.CapacityScheduler` admits waiting
  requests against the KV cache under the configured policy.
* :class:`MicroBatchScheduler` picks this step's work among the admitted requests
  under ``max_batch_size`` and the ``max_num_tokens`` token budget: generation
  requests (one token each) first, then context requests, whole or, with chunked
  prefill, in budget-sized chunks, so a long prompt never stalls running streams.

Under ``MAX_UTILIZATION`` the blocks of a step may not fit: the most recently
admitted requests are then *paused* (their blocks freed, their full blocks kept in
the prefix cache when reuse is on) and put back in the waiting queue; when they
are admitted again they recompute their tokens (prompt and output so far) as a
context, so no token is lost or repeated.

Pure Python: no torch, no model. Tests drive it with fake requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rtllm.engine.capacity_scheduler import CapacityScheduler, CapacitySchedulerPolicy
from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.llm_request import FinishReason, LlmRequest, RequestState
from rtllm.engine.waiting_queue import WaitingQueue


@dataclass(slots=True)
class ScheduledRequest:
    """``request`` computes tokens ``[num_computed_tokens, + num_new_tokens)`` this step."""

    request: LlmRequest
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so it samples."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def is_context(self) -> bool:
        return (
            self.request.num_computed_tokens < self.request.num_prompt_tokens
            or self.num_new_tokens > 1
        )


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work, and what admission and preemption did to get there."""

    scheduled: list[ScheduledRequest]
    admitted: list[LlmRequest] = field(default_factory=list)
    paused: list[LlmRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_context_requests(self) -> int:
        return sum(1 for s in self.scheduled if s.is_context)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class MicroBatchScheduler:
    """Selects this step's tokens under the batch-size and token budgets."""

    def __init__(
        self, max_batch_size: int, max_num_tokens: int, enable_chunked_prefill: bool
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.enable_chunked_prefill = enable_chunked_prefill

    def schedule(self, running: list[LlmRequest]) -> list[ScheduledRequest]:
        budget = self.max_num_tokens
        scheduled: list[ScheduledRequest] = []
        generation = [r for r in running if r.num_computed_tokens >= r.num_prompt_tokens]
        context = [r for r in running if r.num_computed_tokens < r.num_prompt_tokens]
        beam_members = _live_beam_members(generation)
        for request in generation:
            if request.num_tokens >= request.max_total_tokens:
                continue  # its last token is still on the device (overlap loop); nothing to compute
            if len(scheduled) >= self.max_batch_size or budget < 1:
                return scheduled
            members = beam_members.get(request.client_id)
            if members is not None:  # a beam search runs all its beams in one step, or waits
                if request is members[0] and len(scheduled) + len(members) <= self.max_batch_size and budget >= len(members):
                    scheduled.extend(ScheduledRequest(m, 1) for m in members)
                    budget -= len(members)
                continue
            # More than one token only for a paused request recomputing its output so
            # far; that recomputation is always chunked to the budget.
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            scheduled.append(ScheduledRequest(request, count))
            budget -= count
        for request in context:
            if len(scheduled) >= self.max_batch_size or budget < 1:
                break
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining <= budget:
                scheduled.append(ScheduledRequest(request, remaining))
                budget -= remaining
            elif self.enable_chunked_prefill or request.output_token_ids:
                scheduled.append(ScheduledRequest(request, budget))
                budget = 0
        return scheduled


def _live_beam_members(generation: list[LlmRequest]) -> dict[int, list[LlmRequest]]:
    """Client id -> the running beams of each beam search among ``generation``."""
    groups: dict[int, list[LlmRequest]] = {}
    for request in generation:
        group = request.group
        if group is not None and group.is_beam_search:
            groups.setdefault(request.client_id, []).append(request)
    return groups


class Scheduler:
    """Owns the waiting queue and running set; composes capacity and micro-batch stages."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_batch_size: int,
        max_num_tokens: int,
        enable_chunked_prefill: bool = False,
        policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
    ) -> None:
        self.kv_cache = kv_cache
        self.capacity = CapacityScheduler(kv_cache, max_batch_size, policy)
        self.micro_batch = MicroBatchScheduler(
            max_batch_size, max_num_tokens, enable_chunked_prefill
        )
        self.waiting = WaitingQueue()
        self.running: list[LlmRequest] = []  # in admission order
        self.num_paused_total = 0

    @property
    def policy(self) -> CapacitySchedulerPolicy:
        return self.capacity.policy

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: LlmRequest) -> None:
        self.waiting.push(request)

    def schedule(self) -> SchedulerOutput:
        """Admit what fits, pick this step's tokens and allocate their KV blocks."""
        for request in self.running:
            self.kv_cache.cache_full_blocks(request)
        admitted = self.capacity.admit(self.running, self.waiting)
        self.running.extend(admitted)
        paused: list[LlmRequest] = []
        while True:
            scheduled = self.micro_batch.schedule(self.running)
            if self._blocks_needed(scheduled) <= self.kv_cache.num_free_blocks:
                break
            if self.policy is not CapacitySchedulerPolicy.MAX_UTILIZATION or not self.running:
                raise RuntimeError(
                    f"the KV cache ran out of blocks under {self.policy.value} "
                    f"({self.kv_cache.num_free_blocks} free of {self.kv_cache.num_blocks})"
                )
            victim = next((r for r in reversed(self.running) if not _is_beam(r)), None)
            if victim is None:
                raise RuntimeError("the KV cache is too small for the running beam searches")
            self.running.remove(victim)
            paused.append(self._pause(victim))
        for item in scheduled:
            request = item.request
            self.kv_cache.allocate(request, request.num_computed_tokens + item.num_new_tokens)
        return SchedulerOutput(scheduled, admitted, paused)

    def _blocks_needed(self, scheduled: list[ScheduledRequest]) -> int:
        kv = self.kv_cache
        return sum(
            max(
                0,
                kv.num_blocks_for(s.request.num_computed_tokens + s.num_new_tokens)
                - kv.num_allocated_blocks(s.request.request_id),
            )
            for s in scheduled
        )

    def _pause(self, request: LlmRequest) -> LlmRequest:
        """Free a running request's blocks and queue it to be recomputed later."""
        self.kv_cache.cache_full_blocks(request)
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.prompt_logit_chunks = []  # recollected when its prompt is computed again
        request.num_preemptions += 1
        request.state = RequestState.WAITING
        self.num_paused_total += 1
        self.waiting.push(request)
        return request

    def remove(self, request: LlmRequest) -> None:
        """Drop a finished request and free its KV blocks (from any queue).

        Its full blocks stay reusable unless it failed (its KV may then be garbage).
        """
        if request in self.running:
            self.running.remove(request)
        self.waiting.remove(request)
        if request.finish_reason is not FinishReason.ERROR:
            self.kv_cache.cache_full_blocks(request)
        self.kv_cache.free(request.request_id)


def _is_beam(request: LlmRequest) -> bool:
    return request.group is not None and request.group.is_beam_search
