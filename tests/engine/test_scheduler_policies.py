"""Capacity policies, pausing under MAX_UTILIZATION, and the waiting queue's order."""

from __future__ import annotations

from rtllm.engine.capacity_scheduler import CapacitySchedulerPolicy
from rtllm.engine.kv_cache import KVCacheManager
from rtllm.engine.llm_request import LlmRequest, RequestState, SamplingConfig
from rtllm.engine.scheduler import Scheduler
from rtllm.engine.waiting_queue import WaitingQueue

POLICY = CapacitySchedulerPolicy


def req(request_id: int, num_prompt: int, max_tokens: int = 4, priority: float = 0.0) -> LlmRequest:
    tokens = [1 + (request_id * 7 + i) % 50 for i in range(num_prompt)]
    return LlmRequest(request_id, tokens, SamplingConfig(max_tokens=max_tokens), 4096, priority=priority)


def run_step(sched: Scheduler, sampled: int = 9) -> list[int]:
    """Schedule one step and pretend it ran (every sampling request gets ``sampled``)."""
    out = sched.schedule()
    for item in out.scheduled:
        samples = item.samples
        item.request.num_computed_tokens += item.num_new_tokens
        if samples:
            item.request.output_token_ids.append(sampled)
    for item in list(out.scheduled):
        r = item.request
        if len(r.output_token_ids) >= r.sampling.max_tokens:
            r.state = RequestState.FINISHED
            sched.remove(r)
    return [s.request.request_id for s in out.scheduled]


def test_waiting_queue_orders_by_priority_then_arrival() -> None:
    queue = WaitingQueue()
    for request_id, prio in [(0, 0), (1, 5), (2, 0), (3, 5), (4, -1)]:
        queue.push(req(request_id, 2, priority=prio))
    assert [r.request_id for r in queue] == [1, 3, 0, 2, 4]
    first = queue.pop()
    queue.push(first)  # a paused request keeps its arrival number: back at the front
    assert [r.request_id for r in queue] == [1, 3, 0, 2, 4]
    assert queue.remove(first) and not queue.remove(first)
    assert len(queue) == 4


def test_higher_priority_is_admitted_first() -> None:
    sched = Scheduler(KVCacheManager(100, 4), max_batch_size=1, max_num_tokens=64)
    for request_id, prio in [(0, 0.0), (1, 2.0), (2, 1.0)]:
        sched.add_request(req(request_id, 3, max_tokens=1, priority=prio))
    order = []
    while sched.has_work:
        order.extend(run_step(sched))
    assert order == [1, 2, 0]


def test_static_batch_admits_only_when_the_batch_is_done() -> None:
    sched = Scheduler(KVCacheManager(100, 4), 8, 64, policy=POLICY.STATIC_BATCH)
    sched.add_request(req(0, 3, max_tokens=2))
    sched.add_request(req(1, 3, max_tokens=5))
    assert run_step(sched) == [0, 1]
    sched.add_request(req(2, 3, max_tokens=1))
    steps = []
    while sched.has_work:
        steps.append(run_step(sched))
    assert steps[:4] == [[0, 1], [1], [1], [1]]  # request 2 waits for the whole batch
    assert steps[4:] == [[2]]


def test_guaranteed_no_evict_never_pauses() -> None:
    sched = Scheduler(KVCacheManager(6, 4), 8, 64, policy=POLICY.GUARANTEED_NO_EVICT)
    for request_id in range(4):
        sched.add_request(req(request_id, 4, max_tokens=8))  # 3 blocks to completion each
    seen_running = 0
    while sched.has_work:
        out_ids = run_step(sched)
        seen_running = max(seen_running, len(out_ids))
        assert sched.num_paused_total == 0
    assert seen_running == 2


def test_max_utilization_admits_more_and_pauses_newest_when_blocks_run_out() -> None:
    kv = KVCacheManager(6, 4)
    sched = Scheduler(kv, 8, 64, policy=POLICY.MAX_UTILIZATION)
    requests = [req(i, 4, max_tokens=8) for i in range(3)]  # 3 blocks each to completion
    for r in requests:
        sched.add_request(r)
    paused_steps = []
    admitted_first: list[int] = []
    while sched.has_work:
        out = sched.schedule()
        if not admitted_first:
            admitted_first = [r.request_id for r in out.admitted]
        paused_steps.extend(p.request_id for p in out.paused)
        for item in out.scheduled:
            r = item.request
            r.num_computed_tokens += item.num_new_tokens
            if item.samples:
                r.output_token_ids.append(100 + len(r.output_token_ids))
        for item in out.scheduled:
            r = item.request
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                r.state = RequestState.FINISHED
                sched.remove(r)
        assert kv.num_free_blocks >= 0
    assert admitted_first == [0, 1, 2]  # greedy admission: 9 blocks to completion, 6 in the pool
    assert paused_steps and paused_steps[0] == 2  # the most recently admitted goes first
    for r in requests:  # every request got all its tokens, none repeated or lost
        assert r.output_token_ids == [100 + i for i in range(8)]
    assert kv.num_free_blocks == kv.num_blocks
    assert requests[2].num_preemptions >= 1


def test_paused_request_with_a_pending_token_waits_for_it() -> None:
    kv = KVCacheManager(8, 4)
    sched = Scheduler(kv, 8, 64, policy=POLICY.MAX_UTILIZATION)
    r = req(0, 3, max_tokens=8)
    r.output_token_ids = [5, -1]
    r.num_pending_tokens = 1
    sched.add_request(r)
    assert not sched.schedule()  # its last token is still on the device
    r.output_token_ids[-1] = 6
    r.num_pending_tokens = 0
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(0, 5)]


def test_resumed_request_recomputation_is_chunked_to_the_budget() -> None:
    kv = KVCacheManager(64, 4)
    sched = Scheduler(kv, 8, max_num_tokens=6, policy=POLICY.MAX_UTILIZATION)
    r = req(0, 5, max_tokens=20)
    r.output_token_ids = [9] * 8  # paused after 8 tokens: 13 to recompute
    sched.add_request(r)
    chunks = []
    while r.num_computed_tokens < r.num_tokens:
        out = sched.schedule()
        chunks.append(out.scheduled[0].num_new_tokens)
        r.num_computed_tokens += out.scheduled[0].num_new_tokens
    assert chunks == [6, 6, 1]  # prompt and outputs recomputed in budget-sized chunks


def test_prefix_reuse_at_admission() -> None:
    kv = KVCacheManager(32, 4, enable_block_reuse=True)
    sched = Scheduler(kv, 8, 64)
    first = req(0, 10, max_tokens=1)
    sched.add_request(first)
    while sched.has_work:
        run_step(sched)
    second = LlmRequest(1, first.prompt_token_ids[:8] + [40, 41], SamplingConfig(max_tokens=1), 4096)
    sched.add_request(second)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(1, 2)]
    assert second.num_cached_tokens == 8
