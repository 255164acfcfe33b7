"""Tests for rtllm.engine.kv_cache.block_pool.BlockPool."""

from __future__ import annotations

import pytest

from rtllm.engine.kv_cache import BlockPool, OutOfBlocksError


def test_new_pool_is_all_free() -> None:
    pool = BlockPool(5)
    assert pool.num_blocks == 5
    assert pool.num_free_blocks == 5
    assert pool.num_used_blocks == 0
    assert [pool.ref_count(b) for b in range(5)] == [0] * 5


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_non_positive_size_raises(num_blocks: int) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks)


def test_allocate_returns_ids_in_order() -> None:
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free_blocks == 1
    assert pool.num_used_blocks == 5
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]


def test_allocate_zero_is_empty_and_changes_nothing() -> None:
    pool = BlockPool(3)
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 3
    assert pool.allocate(1) == [0]


def test_freed_blocks_are_reused_fifo_oldest_freed_first() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    assert (a, b) == ([0, 1], [2, 3])
    pool.free([3, 1])  # freed in this order: 3 then 1
    pool.free([0])
    assert pool.num_free_blocks == 3
    # Oldest freed first: 3, 1, 0.
    assert pool.allocate(1) == [3]
    assert pool.allocate(2) == [1, 0]
    assert pool.num_free_blocks == 0


def test_never_allocated_blocks_come_before_freed_ones() -> None:
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    pool.free([0])
    # 2, 3, 4 were in the queue before 0 was appended.
    assert pool.allocate(4) == [2, 3, 4, 0]


def test_free_returns_blocks_and_resets_ref_count() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 0
    pool.free(blocks)
    assert pool.num_free_blocks == 3
    assert pool.num_used_blocks == 0
    assert [pool.ref_count(b) for b in blocks] == [0, 0, 0]


def test_double_free_raises() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed more often than allocated"):
        pool.free([blocks[0]])
    # The failed free did not put the block into the free list twice.
    assert pool.num_free_blocks == 3


def test_free_of_never_allocated_block_raises() -> None:
    pool = BlockPool(3)
    with pytest.raises(RuntimeError, match="KV block 2"):
        pool.free([2])
    assert pool.num_free_blocks == 3


def test_exhaustion_raises_without_partial_allocation() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    with pytest.raises(OutOfBlocksError, match="asked for 2 KV blocks, only 1 free"):
        pool.allocate(2)
    # Nothing was taken by the failed call.
    assert pool.num_free_blocks == 1
    assert pool.ref_count(3) == 0
    assert pool.allocate(1) == [3]
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)


def test_out_of_blocks_is_a_runtime_error() -> None:
    assert issubclass(OutOfBlocksError, RuntimeError)


def test_allocate_whole_pool_then_one_more() -> None:
    pool = BlockPool(2)
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)
    pool.free([1])
    assert pool.allocate(1) == [1]


def test_many_cycles_keep_accounting_consistent() -> None:
    pool = BlockPool(8)
    held: list[list[int]] = []
    for i in range(50):
        n = 1 + i % 3
        if pool.num_free_blocks >= n:
            held.append(pool.allocate(n))
        else:
            pool.free(held.pop(0))
        used = sum(len(h) for h in held)
        assert pool.num_used_blocks == used
        assert pool.num_free_blocks == 8 - used
        owned = sorted(b for h in held for b in h)
        assert len(owned) == len(set(owned))  # no block handed out twice
        assert all(pool.ref_count(b) == 1 for b in owned)


def test_free_negative_block_id_raises() -> None:
    pool = BlockPool(3)
    pool.allocate(3)
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        pool.free([-1])


def test_allocate_negative_raises() -> None:
    pool = BlockPool(3)
    with pytest.raises(ValueError):
        pool.allocate(-1)
