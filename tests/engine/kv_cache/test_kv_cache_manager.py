"""Tests for rtllm.engine.kv_cache.kv_cache_manager.KVCacheManager."""

from __future__ import annotations

import pytest

from rtllm.engine.kv_cache import KVCacheManager, OutOfBlocksError
from rtllm.engine.llm_request import LlmRequest, SamplingConfig


def make_request(request_id: int, num_prompt: int = 4, max_tokens: int = 8) -> LlmRequest:
    return LlmRequest(
        request_id, list(range(num_prompt)), SamplingConfig(max_tokens=max_tokens), 1024
    )


@pytest.mark.parametrize(
    ("num_tokens", "tokens_per_block", "expected"),
    [
        (0, 4, 0),
        (1, 4, 1),
        (3, 4, 1),
        (4, 4, 1),
        (5, 4, 2),
        (8, 4, 2),
        (9, 4, 3),
        (1, 1, 1),
        (7, 1, 7),
        (33, 32, 2),
    ],
)
def test_num_blocks_for_is_ceil_division(
    num_tokens: int, tokens_per_block: int, expected: int
) -> None:
    assert KVCacheManager(16, tokens_per_block).num_blocks_for(num_tokens) == expected


def test_properties_reflect_pool() -> None:
    kv = KVCacheManager(10, 4)
    assert kv.num_blocks == 10
    assert kv.num_free_blocks == 10
    assert kv.tokens_per_block == 4
    kv.allocate(make_request(0), 9)
    assert kv.num_free_blocks == 7
    assert kv.num_blocks == 10


def test_allocate_gives_exact_block_ids_fifo_across_requests() -> None:
    kv = KVCacheManager(10, 4)
    a, b = make_request(1), make_request(2)
    kv.allocate(a, 5)  # 2 blocks
    kv.allocate(b, 4)  # 1 block
    assert kv.block_table(1) == [0, 1]
    assert kv.block_table(2) == [2]
    assert kv.num_allocated_blocks(1) == 2
    assert kv.num_allocated_blocks(2) == 1
    assert kv.num_free_blocks == 7


def test_lazy_growth_across_block_boundaries() -> None:
    kv = KVCacheManager(16, 4)
    a, b = make_request(7), make_request(8)
    kv.allocate(a, 3)
    assert kv.block_table(7) == [0]
    kv.allocate(b, 1)
    assert kv.block_table(8) == [1]
    # Growing inside the current block allocates nothing.
    kv.allocate(a, 4)
    assert kv.block_table(7) == [0]
    assert kv.num_free_blocks == 14
    # Crossing the boundary takes the next free block (interleaved with b's).
    kv.allocate(a, 5)
    assert kv.block_table(7) == [0, 2]
    kv.allocate(b, 5)
    assert kv.block_table(8) == [1, 3]
    # Growing by several blocks at once.
    kv.allocate(a, 17)
    assert kv.block_table(7) == [0, 2, 4, 5, 6]
    assert kv.num_free_blocks == 16 - 7


def test_allocate_never_shrinks() -> None:
    kv = KVCacheManager(8, 4)
    r = make_request(0)
    kv.allocate(r, 12)
    assert kv.block_table(0) == [0, 1, 2]
    kv.allocate(r, 1)
    kv.allocate(r, 0)
    assert kv.block_table(0) == [0, 1, 2]
    assert kv.num_free_blocks == 5


def test_token_by_token_growth() -> None:
    kv = KVCacheManager(8, 4)
    r = make_request(0)
    tables = []
    for n in range(1, 14):
        kv.allocate(r, n)
        tables.append(list(kv.block_table(0)))
    assert [len(t) for t in tables] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert tables[-1] == [0, 1, 2, 3]


def test_free_returns_blocks_and_is_idempotent() -> None:
    kv = KVCacheManager(6, 4)
    a, b = make_request(0), make_request(1)
    kv.allocate(a, 8)
    kv.allocate(b, 4)
    kv.free(0)
    assert kv.num_free_blocks == 5
    assert kv.num_allocated_blocks(0) == 0
    with pytest.raises(KeyError):
        kv.block_table(0)
    kv.free(0)  # idempotent: no error, no double free in the pool
    assert kv.num_free_blocks == 5
    kv.free(12345)  # never seen: no-op
    assert kv.num_free_blocks == 5
    assert kv.block_table(1) == [2]
    assert kv.pool.ref_count(2) == 1
    assert kv.pool.ref_count(0) == 0


def test_freed_blocks_are_reused_fifo_tail_first() -> None:
    kv = KVCacheManager(4, 2)
    a, b, c = make_request(0), make_request(1), make_request(2)
    kv.allocate(a, 4)  # [0, 1]
    kv.allocate(b, 4)  # [2, 3]
    kv.free(1)  # 3, 2 back (a table is freed tail first)
    kv.free(0)  # 1, 0 back after them
    kv.allocate(c, 8)
    assert kv.block_table(2) == [3, 2, 1, 0]


def test_request_table_restarts_after_free() -> None:
    kv = KVCacheManager(4, 2)
    r = make_request(0)
    kv.allocate(r, 3)
    assert kv.block_table(0) == [0, 1]
    kv.free(0)
    kv.allocate(r, 1)
    assert kv.block_table(0) == [2]


def test_exhaustion_raises_without_partial_allocation() -> None:
    kv = KVCacheManager(4, 4)
    a, b = make_request(0), make_request(1)
    kv.allocate(a, 8)
    assert kv.block_table(0) == [0, 1]
    with pytest.raises(OutOfBlocksError):
        kv.allocate(b, 12)  # needs 3, only 2 free
    assert kv.num_free_blocks == 2
    assert kv.num_allocated_blocks(1) == 0
    with pytest.raises(OutOfBlocksError):
        kv.allocate(a, 20)  # a grows by 3, only 2 free
    assert kv.block_table(0) == [0, 1]
    assert kv.num_free_blocks == 2
    # What fits still works, and gets the blocks a failed call did not take.
    kv.allocate(b, 8)
    assert kv.block_table(1) == [2, 3]
    assert kv.num_free_blocks == 0
    kv.free(0)
    kv.free(1)
    assert kv.num_free_blocks == 4


def test_free_after_failed_allocation_is_safe() -> None:
    kv = KVCacheManager(2, 4)
    r = make_request(0)
    with pytest.raises(OutOfBlocksError):
        kv.allocate(r, 100)
    kv.free(0)
    assert kv.num_free_blocks == 2
