"""Tests for rtllm.engine.scheduler with fake requests (no model, no torch)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from rtllm.engine.kv_cache import KVCacheManager
from rtllm.engine.llm_request import LlmRequest, RequestState, SamplingConfig
from rtllm.engine.scheduler import (
    CapacityScheduler,
    MicroBatchScheduler,
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
)
from rtllm.engine.waiting_queue import WaitingQueue


def req(
    request_id: int, num_prompt: int, max_tokens: int = 4, max_seq_len: int = 4096
) -> LlmRequest:
    return LlmRequest(
        request_id,
        [1 + (request_id + i) % 50 for i in range(num_prompt)],
        SamplingConfig(max_tokens=max_tokens),
        max_seq_len,
    )


def queue_of(requests: Iterable[LlmRequest]) -> WaitingQueue:
    waiting = WaitingQueue()
    for r in requests:
        waiting.push(r)
    return waiting


def gen_req(request_id: int, num_prompt: int = 3, num_output: int = 1) -> LlmRequest:
    """A request in the generation phase: prompt computed, one sampled token pending."""
    r = req(request_id, num_prompt, max_tokens=100)
    r.output_token_ids = [7] * num_output
    r.num_computed_tokens = r.num_tokens - 1
    r.state = RequestState.RUNNING
    return r


def ids(scheduled: list[ScheduledRequest]) -> list[tuple[int, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in scheduled]


def advance(output: SchedulerOutput, token: int = 9) -> None:
    """What the engine does after a step: progress, then a token for sampling rows."""
    sampling = [s for s in output.scheduled if s.samples]
    for s in output.scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
    for s in sampling:
        s.request.output_token_ids.append(token)


# ---- CapacityScheduler (GUARANTEED_NO_EVICT) ------------------------------------------


def test_blocks_to_completion_uses_prompt_plus_max_tokens() -> None:
    cap = CapacityScheduler(KVCacheManager(100, 4), 8)
    assert cap.blocks_to_completion(req(0, 4, max_tokens=8)) == 3  # 12 tokens
    assert cap.blocks_to_completion(req(0, 4, max_tokens=9)) == 4  # 13 tokens
    assert cap.blocks_to_completion(req(0, 1, max_tokens=1)) == 1
    # Capped by max_seq_len.
    assert cap.blocks_to_completion(req(0, 4, max_tokens=100, max_seq_len=16)) == 4


def test_admits_while_blocks_to_completion_fit() -> None:
    kv = KVCacheManager(10, 4)
    cap = CapacityScheduler(kv, 100)
    waiting = queue_of(req(i, 4, max_tokens=8) for i in range(5))  # 3 blocks each
    admitted = cap.admit([], waiting)
    assert [r.request_id for r in admitted] == [0, 1, 2]
    assert all(r.state is RequestState.RUNNING for r in admitted)
    assert [r.request_id for r in waiting] == [3, 4]
    assert all(r.state is RequestState.WAITING for r in waiting)
    # Admission reserves, it does not allocate.
    assert kv.num_free_blocks == 10


def test_exact_fit_is_admitted() -> None:
    cap = CapacityScheduler(KVCacheManager(6, 4), 100)
    waiting = queue_of([req(0, 4, max_tokens=8), req(1, 5, max_tokens=7), req(2, 1, max_tokens=1)])
    # 3 + 3 = 6 blocks exactly; the third (1 block) no longer fits.
    assert [r.request_id for r in cap.admit([], waiting)] == [0, 1]
    assert [r.request_id for r in waiting] == [2]


def test_running_requests_reserve_their_worst_case() -> None:
    kv = KVCacheManager(10, 4)
    cap = CapacityScheduler(kv, 100)
    running = [req(0, 4, max_tokens=20)]  # 6 blocks reserved even though none is allocated
    waiting = queue_of([req(1, 4, max_tokens=12), req(2, 4, max_tokens=12)])  # 4 blocks each
    assert [r.request_id for r in cap.admit(running, waiting)] == [1]
    assert [r.request_id for r in waiting] == [2]


def test_strict_fifo_head_blocks_smaller_requests_behind_it() -> None:
    cap = CapacityScheduler(KVCacheManager(10, 4), 100)
    running = [req(0, 4, max_tokens=16)]  # 5 blocks
    big = req(1, 8, max_tokens=16)  # 6 blocks: does not fit next to 5
    small = req(2, 1, max_tokens=1)  # 1 block: would fit
    waiting = queue_of([big, small])
    assert cap.admit(running, waiting) == []
    assert list(waiting) == [big, small]
    assert small.state is RequestState.WAITING
    # Once the running request is gone, both fit, in order.
    assert cap.admit([], waiting) == [big, small]


def test_max_num_requests_caps_running() -> None:
    cap = CapacityScheduler(KVCacheManager(1000, 4), 3)
    waiting = queue_of(req(i, 2) for i in range(6))
    running = [req(100, 2)]
    admitted = cap.admit(running, waiting)
    assert [r.request_id for r in admitted] == [0, 1]
    running += admitted
    assert cap.admit(running, waiting) == []
    assert len(waiting) == 4


def test_request_larger_than_pool_is_never_admitted() -> None:
    cap = CapacityScheduler(KVCacheManager(2, 4), 10)
    waiting = queue_of([req(0, 8, max_tokens=1)])  # 9 tokens -> 3 blocks > 2
    assert cap.admit([], waiting) == []
    assert len(waiting) == 1


# ---- MicroBatchScheduler ------------------------------------------------------------


def test_generation_requests_are_scheduled_first() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=100, enable_chunked_prefill=False)
    c1, g1, c2, g2 = req(1, 5), gen_req(2), req(3, 6), gen_req(4)
    scheduled = mb.schedule([c1, g1, c2, g2])
    assert ids(scheduled) == [(2, 1), (4, 1), (1, 5), (3, 6)]


def test_token_budget_context_that_does_not_fit_waits_without_chunking() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=10, enable_chunked_prefill=False)
    g1, g2 = gen_req(1), gen_req(2)
    c1, c2 = req(3, 5), req(4, 4)
    # 2 generation tokens + 5 = 7; c2 needs 4 > 3 left -> not scheduled, no chunk.
    scheduled = mb.schedule([g1, g2, c1, c2])
    assert ids(scheduled) == [(1, 1), (2, 1), (3, 5)]
    assert sum(s.num_new_tokens for s in scheduled) <= 10


def test_context_longer_than_budget_never_split_without_chunking() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=8, enable_chunked_prefill=False)
    assert mb.schedule([req(1, 9)]) == []
    assert ids(mb.schedule([req(1, 8)])) == [(1, 8)]


def test_generation_fills_budget_and_context_waits() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=3, enable_chunked_prefill=True)
    gens = [gen_req(i) for i in range(4)]
    # Budget 3: three generation tokens, the fourth and the context wait.
    assert ids(mb.schedule([*gens, req(9, 2)])) == [(0, 1), (1, 1), (2, 1)]


def test_max_batch_size_caps_scheduled_requests() -> None:
    mb = MicroBatchScheduler(max_batch_size=3, max_num_tokens=1000, enable_chunked_prefill=False)
    running = [gen_req(0), req(1, 4), gen_req(2), req(3, 4), req(4, 4)]
    assert ids(mb.schedule(running)) == [(0, 1), (2, 1), (1, 4)]


def test_chunked_prefill_chunk_sizes_exact() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=10, enable_chunked_prefill=True)
    r = req(1, 25)
    chunks = []
    samples = []
    while r.num_computed_tokens < r.num_prompt_tokens:
        scheduled = mb.schedule([r])
        assert len(scheduled) == 1
        chunks.append(scheduled[0].num_new_tokens)
        samples.append(scheduled[0].samples)
        advance(SchedulerOutput(scheduled))
    assert chunks == [10, 10, 5]
    assert samples == [False, False, True]
    assert r.output_token_ids == [9]


def test_chunked_prefill_shares_budget_with_generation() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=10, enable_chunked_prefill=True)
    g1, g2 = gen_req(1), gen_req(2)
    c1, c2 = req(3, 5), req(4, 20)
    # 2 generation + 5 whole + a chunk of the 3 left; nothing after the budget is gone.
    c3 = req(5, 1)
    assert ids(mb.schedule([g1, g2, c1, c2, c3])) == [(1, 1), (2, 1), (3, 5), (4, 3)]


def test_chunked_prefill_continues_from_computed_tokens() -> None:
    mb = MicroBatchScheduler(max_batch_size=10, max_num_tokens=6, enable_chunked_prefill=True)
    r = req(1, 20)
    r.num_computed_tokens = 16
    scheduled = mb.schedule([r])
    assert ids(scheduled) == [(1, 4)]
    assert scheduled[0].samples


# ---- ScheduledRequest / SchedulerOutput -------------------------------------------------


def test_scheduled_request_samples() -> None:
    r = req(1, 10)
    assert ScheduledRequest(r, 10).samples
    assert not ScheduledRequest(r, 9).samples
    r.num_computed_tokens = 4
    assert ScheduledRequest(r, 6).samples
    assert not ScheduledRequest(r, 5).samples
    g = gen_req(2, num_prompt=3, num_output=2)
    assert ScheduledRequest(g, 1).samples


def test_scheduler_output_counts() -> None:
    c = req(1, 10)
    c.num_computed_tokens = 4  # chunked context still counts as context
    g = gen_req(2)
    out = SchedulerOutput(
        [ScheduledRequest(g, 1), ScheduledRequest(c, 3), ScheduledRequest(req(3, 2), 2)]
    )
    assert out.num_tokens == 6
    assert out.num_context_requests == 2
    assert out
    assert not SchedulerOutput([])


# ---- Scheduler ------------------------------------------------------------------------


def test_schedule_admits_schedules_and_allocates_blocks() -> None:
    kv = KVCacheManager(20, 4)
    sched = Scheduler(kv, max_batch_size=8, max_num_tokens=64)
    a, b = req(1, 5, max_tokens=4), req(2, 3, max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    assert sched.has_work
    out = sched.schedule()
    assert ids(out.scheduled) == [(1, 5), (2, 3)]
    assert sched.running == [a, b]
    assert not sched.waiting
    assert kv.block_table(1) == [0, 1]
    assert kv.block_table(2) == [2]
    advance(out)
    # Generation: a goes to 6 tokens (2 blocks), b to 4 tokens (still 1 block).
    out = sched.schedule()
    assert ids(out.scheduled) == [(1, 1), (2, 1)]
    assert kv.block_table(1) == [0, 1]
    assert kv.block_table(2) == [2]
    advance(out)
    out = sched.schedule()
    advance(out)
    # b crossed into its second block at 5 tokens.
    assert kv.block_table(2) == [2, 3]
    assert kv.num_free_blocks == 16


def test_schedule_respects_admission_and_fifo() -> None:
    kv = KVCacheManager(6, 4)
    sched = Scheduler(kv, max_batch_size=8, max_num_tokens=64)
    a = req(1, 4, max_tokens=8)  # 3 blocks
    big = req(2, 4, max_tokens=12)  # 4 blocks
    small = req(3, 1, max_tokens=1)  # 1 block
    for r in (a, big, small):
        sched.add_request(r)
    out = sched.schedule()
    assert ids(out.scheduled) == [(1, 4)]
    assert list(sched.waiting) == [big, small]
    advance(out)
    sched.remove(a)
    assert kv.num_free_blocks == 6
    out = sched.schedule()
    assert ids(out.scheduled) == [(2, 4), (3, 1)]


def test_schedule_returns_empty_output_without_work() -> None:
    sched = Scheduler(KVCacheManager(4, 4), max_batch_size=2, max_num_tokens=8)
    assert not sched.has_work
    out = sched.schedule()
    assert not out
    assert out.scheduled == []


def test_max_batch_size_caps_running_in_scheduler() -> None:
    kv = KVCacheManager(100, 4)
    sched = Scheduler(kv, max_batch_size=2, max_num_tokens=100)
    reqs = [req(i, 3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert ids(out.scheduled) == [(0, 3), (1, 3)]
    assert sched.running == reqs[:2]
    assert list(sched.waiting) == reqs[2:]


def test_chunked_scheduler_allocates_per_chunk() -> None:
    kv = KVCacheManager(20, 4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=6, enable_chunked_prefill=True)
    r = req(1, 14, max_tokens=2)
    sched.add_request(r)
    sizes = []
    tables = []
    for _ in range(3):
        out = sched.schedule()
        sizes.append(out.scheduled[0].num_new_tokens)
        tables.append(list(kv.block_table(1)))
        advance(out)
    assert sizes == [6, 6, 2]
    assert tables == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert r.output_token_ids == [9]


def test_remove_frees_blocks_of_running_request() -> None:
    kv = KVCacheManager(10, 4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    a, b = req(1, 9), req(2, 2)
    sched.add_request(a)
    sched.add_request(b)
    advance(sched.schedule())
    assert kv.num_free_blocks == 10 - 3 - 1
    sched.remove(a)
    assert sched.running == [b]
    assert kv.num_free_blocks == 10 - 1
    assert kv.num_allocated_blocks(1) == 0
    sched.remove(a)  # twice: harmless
    assert kv.num_free_blocks == 9
    sched.remove(b)
    assert kv.num_free_blocks == 10
    assert not sched.has_work


def test_remove_waiting_request() -> None:
    kv = KVCacheManager(3, 4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    a, b, c = req(1, 4, max_tokens=8), req(2, 4, max_tokens=8), req(3, 1, max_tokens=1)
    for r in (a, b, c):
        sched.add_request(r)
    sched.schedule()
    assert list(sched.waiting) == [b, c]
    sched.remove(b)
    assert list(sched.waiting) == [c]
    assert sched.running == [a]
    assert kv.num_free_blocks == 2  # a holds 1 block for its 4 prompt tokens


def test_freed_reservation_lets_waiting_request_in() -> None:
    kv = KVCacheManager(4, 4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    a, b = req(1, 4, max_tokens=12), req(2, 4, max_tokens=12)  # 4 blocks each
    sched.add_request(a)
    sched.add_request(b)
    assert ids(sched.schedule().scheduled) == [(1, 4)]
    assert ids(sched.schedule().scheduled) == [(1, 4)]  # nothing advanced: same work again
    sched.remove(a)
    assert ids(sched.schedule().scheduled) == [(2, 4)]


@pytest.mark.parametrize("chunked", [False, True])
def test_simulated_run_never_runs_out_of_blocks(chunked: bool) -> None:
    kv = KVCacheManager(12, 4)
    sched = Scheduler(kv, max_batch_size=3, max_num_tokens=10, enable_chunked_prefill=chunked)
    reqs = [req(i, 2 + (i * 3) % 9, max_tokens=1 + (i * 5) % 7) for i in range(12)]
    for r in reqs:
        sched.add_request(r)
    finished: list[int] = []
    for _ in range(500):
        if not sched.has_work:
            break
        out = sched.schedule()
        assert out, "scheduler stalled with work left"
        assert out.num_tokens <= 10
        assert len(out.scheduled) <= 3
        assert len(sched.running) <= 3
        advance(out)
        for s in out.scheduled:
            r = s.request
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                sched.remove(r)
                finished.append(r.request_id)
    assert not sched.has_work
    assert sorted(finished) == list(range(12))
    assert kv.num_free_blocks == 12
    assert all(len(r.output_token_ids) == r.sampling.max_tokens for r in reqs)
