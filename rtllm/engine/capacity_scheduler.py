"""Admission of waiting requests against the KV cache, under TensorRT-LLM's three policies.

* ``GUARANTEED_NO_EVICT`` (default): a request is admitted only if the blocks *to
  completion* (prompt + ``max_tokens``, capped by ``max_seq_len``) of every admitted
  request fit in the pool, so a running request never runs out of blocks. Shared
  prefix blocks are counted once per holder, which only makes this safer.
* ``MAX_UTILIZATION``: a request is admitted as soon as its current tokens fit
  next to one block of headroom per running request; when blocks run out later,
  the scheduler pauses the most recently admitted requests (see
  :class:`rtllm.engine.scheduler.Scheduler`).
* ``STATIC_BATCH``: like ``GUARANTEED_NO_EVICT``, but nothing is admitted while any
  request of the current batch is still running.

All policies are strict FIFO within the waiting queue's order: a request that does
not fit blocks those behind it, so a long request is never starved by short ones.
Admission also takes each admitted request's reusable prefix from the KV cache.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.llm_request import LlmRequest, RequestState
from rtllm.engine.waiting_queue import WaitingQueue


class CapacitySchedulerPolicy(enum.StrEnum):
    """How the capacity scheduler admits requests against the KV cache."""

    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class CapacityScheduler:
    """Moves requests from the waiting queue to the running set when they fit."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_requests: int,
        policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_requests = max_num_requests
        self.policy = CapacitySchedulerPolicy(policy)

    def blocks_to_completion(self, request: LlmRequest) -> int:
        """Worst-case blocks, counting the sequences a not yet forked group will add."""
        return self.kv_cache.num_blocks_for(request.max_total_tokens) * (1 + _pending_slots(request))

    def admit(self, running: list[LlmRequest], waiting: WaitingQueue) -> list[LlmRequest]:
        """Admit what the policy allows; returns the admitted requests in order."""
        if not waiting or (self.policy is CapacitySchedulerPolicy.STATIC_BATCH and running):
            return []  # (the fit checks below walk every running request)
        if self.policy is CapacitySchedulerPolicy.MAX_UTILIZATION:
            return self._admit(running, waiting, self._fits_now(running))
        return self._admit(running, waiting, self._fits_to_completion(running))

    def _admit(
        self, running: list[LlmRequest], waiting: WaitingQueue, fits: Callable[[LlmRequest], bool]
    ) -> list[LlmRequest]:
        admitted: list[LlmRequest] = []
        slots = len(running) + sum(_pending_slots(r) for r in running)
        while waiting and slots < self.max_num_requests:
            head = waiting.peek()
            # A paused request whose last sampled token is still on the device waits
            # for it: its tokens must be known before they are recomputed.
            too_many = slots and slots + 1 + _pending_slots(head) > self.max_num_requests
            if head.num_pending_tokens or too_many:
                break
            if not fits(head):
                break
            waiting.pop()
            head.state = RequestState.RUNNING
            if not head.sampling.needs_prompt_logits:  # those need every prompt position's logits
                self.kv_cache.match_prefix(head)
            admitted.append(head)
            slots += 1 + _pending_slots(head)
        return admitted

    def _fits_to_completion(self, running: list[LlmRequest]) -> Callable[[LlmRequest], bool]:
        reserved = sum(self.blocks_to_completion(r) for r in running)

        def fits(request: LlmRequest) -> bool:
            nonlocal reserved
            needed = self.blocks_to_completion(request)
            if reserved + needed > self.kv_cache.num_blocks:
                return False
            reserved += needed
            return True

        return fits

    def _fits_now(self, running: list[LlmRequest]) -> Callable[[LlmRequest], bool]:
        # Blocks for the request's whole current context (an upper bound: reused
        # prefix blocks cost nothing or come out of the free count already), plus
        # one block of headroom for each running request's next tokens.
        headroom = len(running)
        taken = 0

        def fits(request: LlmRequest) -> bool:
            nonlocal headroom, taken
            needed = self.kv_cache.num_blocks_for(request.num_tokens) * (1 + _pending_slots(request))
            if taken + needed + headroom > self.kv_cache.num_free_blocks:
                return False
            taken += needed
            headroom += 1
            return True

        return fits


def _pending_slots(request: LlmRequest) -> int:
    return request.group.pending_slots if request.group is not None else 0
