"""Prefix reuse in the block pool and the KV cache manager: hashing, LRU, host tier, events."""

from __future__ import annotations

import pytest

from rtllm.engine.kv_cache import (
    BlockPool,
    CachedBlock,
    KVCacheEventBuffer,
    KVCacheManager,
)
from rtllm.engine.kv_cache.block_hash import block_extra_keys, hash_block
from rtllm.engine.llm_request import LlmRequest, SamplingConfig


class RecordingCopier:
    """Remembers every copy between the device pool and the host tier."""

    def __init__(self) -> None:
        self.copies: list[tuple[str, int, int]] = []

    def offload(self, device_block: int, host_block: int) -> None:
        self.copies.append(("offload", device_block, host_block))

    def onload(self, host_block: int, device_block: int) -> None:
        self.copies.append(("onload", host_block, device_block))


def request(request_id: int, tokens: list[int], salt: str | None = None) -> LlmRequest:
    return LlmRequest(request_id, list(tokens), SamplingConfig(max_tokens=8), 1024, cache_salt=salt)


def compute(kv: KVCacheManager, r: LlmRequest, num_tokens: int | None = None) -> None:
    """Pretend the model computed the request's tokens up to ``num_tokens`` (default all)."""
    target = r.num_tokens if num_tokens is None else num_tokens
    kv.allocate(r, target)
    r.num_computed_tokens = target
    kv.cache_full_blocks(r)


def finish(kv: KVCacheManager, r: LlmRequest) -> None:
    kv.cache_full_blocks(r)
    kv.free(r.request_id)


# ---- hashing --------------------------------------------------------------------------


def test_hash_is_chained_and_deterministic() -> None:
    first = hash_block(None, [1, 2, 3, 4])
    assert first == hash_block(None, [1, 2, 3, 4])
    assert hash_block(first, [5, 6]) != hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6])
    assert hash_block(None, [1, 2]) != hash_block(0, [1, 2])  # "no parent" is not parent 0
    assert hash_block(None, [1, 2], block_extra_keys(cache_salt="a")) != hash_block(None, [1, 2])
    assert 0 <= first < 2**64


# ---- block pool -----------------------------------------------------------------------


def test_pool_prefers_fresh_blocks_and_evicts_cached_oldest_first() -> None:
    evicted: list[int] = []
    pool = BlockPool(4, on_evict=lambda block, cached: evicted.append(block))
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks[:3]):
        assert pool.register(block, CachedBlock(100 + i, None, (i,)))
    pool.free([blocks[1], blocks[0], blocks[3], blocks[2]])
    assert pool.fresh_blocks() == [blocks[3]]
    assert pool.lru_blocks() == [blocks[1], blocks[0], blocks[2]]
    assert pool.allocate(1) == [blocks[3]] and evicted == []  # fresh first
    assert pool.allocate(2) == [blocks[1], blocks[0]]  # then oldest cached
    assert evicted == [blocks[1], blocks[0]]
    assert pool.lookup(101) is None and pool.lookup(100) is None
    assert pool.lookup(102) == blocks[2]


def test_pool_take_revives_a_cached_block_and_register_keeps_the_first() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.register(a, CachedBlock(7, None, (1,)))
    assert not pool.register(b, CachedBlock(7, None, (1,)))  # same hash: first one kept
    pool.free([a, b])
    assert pool.lru_blocks() == [a] and pool.ref_count(a) == 0
    pool.take(a)
    pool.take(a)
    assert pool.ref_count(a) == 2 and pool.lru_blocks() == []
    pool.free([a])
    assert pool.lru_blocks() == []
    pool.free([a])
    assert pool.lru_blocks() == [a]
    with pytest.raises(ValueError, match="holds no reusable KV"):
        pool.take(b)
    with pytest.raises(RuntimeError, match="not referenced"):
        pool.register(b, CachedBlock(8, None, (2,)))


# ---- manager --------------------------------------------------------------------------


def test_second_request_reuses_full_prompt_blocks() -> None:
    kv = KVCacheManager(16, 4, enable_block_reuse=True)
    first = request(0, list(range(10)))  # blocks [0..3] [4..7] + 2 tokens
    assert kv.match_prefix(first) == 0
    compute(kv, first)
    first_blocks = list(kv.block_table(0))
    finish(kv, first)
    second = request(1, list(range(8)) + [50, 51, 52])
    assert kv.match_prefix(second) == 8
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert kv.block_table(1) == first_blocks[:2]
    assert [kv.pool.ref_count(b) for b in first_blocks[:2]] == [1, 1]
    assert kv.counters.reused_blocks == 2 and kv.counters.missed_blocks == 2


def test_at_least_one_token_is_left_to_compute() -> None:
    kv = KVCacheManager(16, 4, enable_block_reuse=True)
    first = request(0, list(range(8)))
    compute(kv, first)
    finish(kv, first)
    again = request(1, list(range(8)))  # same 8 tokens: only the first block may be reused
    assert kv.match_prefix(again) == 4
    longer = request(2, list(range(9)))
    assert kv.match_prefix(longer) == 8


def test_hit_is_confirmed_against_tokens_and_parent() -> None:
    kv = KVCacheManager(8, 2, enable_block_reuse=True)
    r = request(0, [1, 2, 3, 4, 5])
    compute(kv, r)
    finish(kv, r)
    block = kv.pool.lookup(hash_block(None, (1, 2)))
    assert block is not None
    # Forge a collision: the stored tokens no longer match what the hash claims.
    kv.pool._cached[block] = CachedBlock(hash_block(None, (1, 2)), None, (9, 9))
    assert kv.match_prefix(request(1, [1, 2, 3, 4, 5])) == 0


def test_cache_salt_separates_tenants() -> None:
    kv = KVCacheManager(16, 2, enable_block_reuse=True)
    r = request(0, [1, 2, 3, 4, 5], salt="tenant-a")
    compute(kv, r)
    finish(kv, r)
    assert kv.match_prefix(request(1, [1, 2, 3, 4, 5], salt="tenant-b")) == 0
    assert kv.match_prefix(request(2, [1, 2, 3, 4, 5])) == 0
    assert kv.match_prefix(request(3, [1, 2, 3, 4, 5], salt="tenant-a")) == 4


def test_only_committed_tokens_are_hashed() -> None:
    kv = KVCacheManager(16, 2, enable_block_reuse=True)
    r = request(0, [1, 2, 3])
    compute(kv, r)
    r.output_token_ids = [4, -1]  # one committed, one still on the device
    r.num_pending_tokens = 1
    r.num_computed_tokens = 4
    kv.allocate(r, 5)
    kv.cache_full_blocks(r)
    assert kv.pool.lookup(hash_block(hash_block(None, (1, 2)), (3, 4))) is not None
    assert len(kv._hashes[0]) == 2  # the pending token's block is not hashed


def test_reuse_disabled_never_hashes() -> None:
    kv = KVCacheManager(8, 2)
    r = request(0, [1, 2, 3, 4, 5])
    compute(kv, r)
    finish(kv, r)
    assert kv.pool.num_cached_free_blocks == 0
    assert kv.match_prefix(request(1, [1, 2, 3, 4, 5])) == 0


def test_host_tier_offloads_on_eviction_and_onloads_on_hit() -> None:
    copier = RecordingCopier()
    events = KVCacheEventBuffer(100)
    kv = KVCacheManager(4, 2, enable_block_reuse=True, host_cache_blocks=4, copier=copier, events=events)
    a = request(0, [1, 2, 3, 4, 5])  # 2 full blocks + 1 token
    compute(kv, a)
    finish(kv, a)
    filler = request(1, list(range(100, 108)))  # needs all 4 blocks: evicts both cached ones
    compute(kv, filler)
    assert [c[0] for c in copier.copies] == ["offload", "offload"]
    finish(kv, filler)
    b = request(2, [1, 2, 3, 4, 9])
    assert kv.match_prefix(b) == 4  # both blocks come back from the host tier
    assert [c[0] for c in copier.copies].count("onload") == 2
    assert kv.counters.onloaded_blocks == 2
    # Onloading took 2 device blocks, evicting (offloading) two of the filler's.
    assert [c[0] for c in copier.copies].count("offload") == 4
    types = [e["data"]["type"] for e in events.get(timeout=0)]
    assert types[0] == "created" and types.count("updated") == 6 and "removed" not in types


def test_small_host_tier_drops_its_oldest_block() -> None:
    copier = RecordingCopier()
    events = KVCacheEventBuffer(100)
    kv = KVCacheManager(4, 2, enable_block_reuse=True, host_cache_blocks=1, copier=copier, events=events)
    a = request(0, [1, 2, 3, 4, 5])
    compute(kv, a)
    finish(kv, a)  # frees tail first: block (3,4) is older in the LRU than (1,2)
    compute(kv, request(1, list(range(100, 108))))
    assert kv.host.lookup(hash_block(None, (1, 2))) is not None
    assert kv.host.lookup(hash_block(hash_block(None, (1, 2)), (3, 4))) is None
    removed = [e["data"]["block_hashes"] for e in events.get(timeout=0) if e["data"]["type"] == "removed"]
    assert removed == [[hash_block(hash_block(None, (1, 2)), (3, 4))]]


def test_events_report_stored_and_removed_hashes_in_order() -> None:
    events = KVCacheEventBuffer(100)
    kv = KVCacheManager(3, 2, enable_block_reuse=True, events=events)
    r = request(0, [1, 2, 3, 4, 5])
    compute(kv, r)
    finish(kv, r)
    first, second = hash_block(None, (1, 2)), hash_block(hash_block(None, (1, 2)), (3, 4))
    got = events.get(timeout=0)
    assert [e["event_id"] for e in got] == [0, 1]
    assert got[0]["data"] == {"type": "created", "num_blocks_per_cache_level": [3, 0]}
    assert got[1]["data"] == {
        "type": "stored",
        "parent_hash": None,
        "blocks": [
            {"block_hash": first, "token_ids": [1, 2], "cache_level": 0},
            {"block_hash": second, "token_ids": [3, 4], "cache_level": 0},
        ],
    }
    compute(kv, request(1, [7, 7, 7, 7, 7, 7]))  # 3 blocks: the tail-first freed block 2 goes first
    removed = [e["data"] for e in events.get(timeout=0) if e["data"]["type"] == "removed"]
    assert removed == [{"type": "removed", "block_hashes": [second]}, {"type": "removed", "block_hashes": [first]}]


def test_event_buffer_keeps_newest_and_times_out() -> None:
    events = KVCacheEventBuffer(2)
    assert events.get(timeout=0.01) == []
    for i in range(3):
        events.removed([i])
    got = events.get(timeout=0)
    assert [e["data"]["block_hashes"] for e in got] == [[1], [2]]
    with pytest.raises(ValueError, match="event_buffer_max_size"):
        KVCacheEventBuffer(0)
