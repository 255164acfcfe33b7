"""Property tests: random allocate / append / reuse / free / evict / offload sequences
on the KV cache manager, with every invariant checked after every step.

A fake copier stands in for the model runner's KV tensors: each device and host
block holds the tuple of token ids its KV was computed from (the whole prefix up
to the block's last written position), which is exactly what real KV depends on.
So "a reused block holds the right KV" and "host and device copies of a block hold
the same data" become comparisons of tuples.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rtllm.engine.kv_cache import KVCacheManager
from rtllm.engine.llm_request import LlmRequest, SamplingConfig

NUM_BLOCKS = 10
HOST_BLOCKS = 4
BLOCK = 2
TOKENS = st.integers(min_value=1, max_value=3)  # a tiny alphabet: prefixes collide often


class FakeKVStorage:
    """Device and host "KV": per block, the token prefix it was computed from."""

    def __init__(self) -> None:
        self.device: list[tuple[int, ...] | None] = [None] * NUM_BLOCKS
        self.host: list[tuple[int, ...] | None] = [None] * HOST_BLOCKS

    def offload(self, device_block: int, host_block: int) -> None:
        self.host[host_block] = self.device[device_block]

    def onload(self, host_block: int, device_block: int) -> None:
        self.device[device_block] = self.host[host_block]


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.storage = FakeKVStorage()
        self.kv = KVCacheManager(
            NUM_BLOCKS, BLOCK, enable_block_reuse=True, host_cache_blocks=HOST_BLOCKS, copier=self.storage
        )
        self.live: dict[int, LlmRequest] = {}
        self.next_id = 0
        # Our own model of the LRU: cached free blocks in the order they became free.
        self.lru_model: list[int] = []

    # ---- helpers ------------------------------------------------------------------------
    def _sync_lru_model(self, taken: set[int]) -> None:
        """After an operation that may take (hit) or evict cached blocks: hits may leave
        from anywhere, evictions only from the oldest end."""
        still = set(self.kv.pool.lru_blocks())
        model = [b for b in self.lru_model if b not in taken]
        evicted = [b for b in model if b not in still]
        assert model[: len(evicted)] == evicted, "a cached block was evicted before an older one"
        self.lru_model = [b for b in model if b in still]

    def _compute(self, request: LlmRequest, count: int) -> None:
        start = request.num_computed_tokens
        end = min(request.num_tokens, start + count)
        self.kv.allocate(request, end)
        self._sync_lru_model(set())
        table = self.kv.block_table(request.request_id)
        tokens = request.prompt_token_ids + request.output_token_ids
        for position in range(start, end):
            block = table[position // BLOCK]
            self.storage.device[block] = tuple(tokens[: position + 1])
        request.num_computed_tokens = end
        self.kv.cache_full_blocks(request)

    # ---- rules --------------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < 4)
    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=9))
    def add_request(self, prompt: list[int]) -> None:
        request = LlmRequest(self.next_id, prompt, SamplingConfig(max_tokens=8), 64)
        self.next_id += 1
        lru_before = set(self.kv.pool.lru_blocks())
        reused = self.kv.match_prefix(request)
        assert reused % BLOCK == 0 and reused < request.num_tokens
        table = self.kv.block_table(request.request_id) if reused else []
        self._sync_lru_model(set(table) & lru_before)
        for index, block in enumerate(table):  # reused KV is exactly this prefix's KV
            assert self.storage.device[block] == tuple(prompt[: (index + 1) * BLOCK])
        self.live[request.request_id] = request

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(min_value=1, max_value=6))
    def compute(self, data: st.DataObject, count: int) -> None:
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        end = min(request.num_tokens, request.num_computed_tokens + count)
        needed = self.kv.num_blocks_for(end) - self.kv.num_allocated_blocks(request.request_id)
        if needed <= self.kv.num_free_blocks:
            self._compute(request, count)

    @precondition(lambda self: any(r.num_computed_tokens == r.num_tokens for r in self.live.values()))
    @rule(data=st.data(), token=TOKENS)
    def append_token(self, data: st.DataObject, token: int) -> None:
        done = sorted(i for i, r in self.live.items() if r.num_computed_tokens == r.num_tokens)
        self.live[data.draw(st.sampled_from(done))].output_token_ids.append(token)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self._release(self.live.pop(data.draw(st.sampled_from(sorted(self.live)))))

    def _release(self, request: LlmRequest) -> None:
        self.kv.cache_full_blocks(request)
        table = list(self.kv._tables.get(request.request_id, []))
        self.kv.free(request.request_id)
        for block in reversed(table):  # freed tail first
            if self.kv.pool.ref_count(block) == 0 and self.kv.pool.cached(block) is not None:
                self.lru_model.append(block)

    @rule(size=st.integers(min_value=1, max_value=NUM_BLOCKS))
    def pressure(self, size: int) -> None:
        """A throwaway request grabs blocks, forcing evictions (and offloads)."""
        size = min(size, self.kv.num_free_blocks)
        if size:
            filler = LlmRequest(-1, [0] * (size * BLOCK), SamplingConfig(max_tokens=1), 64)
            self._compute(filler, size * BLOCK)
            self._release(filler)

    # ---- invariants ---------------------------------------------------------------------
    @invariant()
    def refcounts_match_holders_and_no_block_is_lost(self) -> None:
        pool = self.kv.pool
        holders = Counter(b for table in self.kv._tables.values() for b in table)
        fresh, lru = pool.fresh_blocks(), pool.lru_blocks()
        assert len(fresh) == len(set(fresh)) and len(lru) == len(set(lru))
        assert not set(fresh) & set(lru)
        for block in range(NUM_BLOCKS):
            assert pool.ref_count(block) == holders.get(block, 0)
            is_free = block in fresh or block in lru
            assert is_free != (pool.ref_count(block) > 0), f"block {block} free xor referenced"
            assert (block in lru) == (is_free and pool.cached(block) is not None)
        assert pool.num_free_blocks + len(holders) == NUM_BLOCKS

    @invariant()
    def lru_order_is_respected(self) -> None:
        assert self.kv.pool.lru_blocks() == self.lru_model

    @invariant()
    def cached_and_host_copies_hold_their_prefix(self) -> None:
        pool, host = self.kv.pool, self.kv.host
        prefixes: dict[int, tuple[int, ...]] = {}
        for block in range(NUM_BLOCKS):
            cached = pool.cached(block)
            if cached is not None:
                assert pool.lookup(cached.block_hash) == block
                assert self.storage.device[block] is not None
                assert self.storage.device[block][-BLOCK:] == cached.token_ids
                prefixes[cached.block_hash] = self.storage.device[block]
        for host_block in host.lru_blocks():
            cached = host.cached(host_block)
            assert host.lookup(cached.block_hash) == host_block
            assert self.storage.host[host_block][-BLOCK:] == cached.token_ids
            if cached.block_hash in prefixes:  # on both tiers: the same data
                assert self.storage.host[host_block] == prefixes[cached.block_hash]

    @invariant()
    def live_requests_see_their_own_kv(self) -> None:
        for request in self.live.values():
            if not request.num_computed_tokens:
                continue
            table = self.kv.block_table(request.request_id)
            tokens = tuple(request.prompt_token_ids + request.output_token_ids)
            for index in range(request.num_computed_tokens // BLOCK):
                assert self.storage.device[table[index]][: (index + 1) * BLOCK] == tokens[: (index + 1) * BLOCK]


TestKVCacheProperties = KVCacheMachine.TestCase
TestKVCacheProperties.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
