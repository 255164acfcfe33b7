"""Per-request block tables over a :class:`BlockPool`, with prefix reuse and a host tier.

Blocks are allocated lazily, as a request's computed tokens grow; admission
control (whether a request may start at all) is the capacity scheduler's job.

With block reuse, every *full* block whose tokens are committed (known on the
host, their KV written) is registered under a hash chained over the prefix (see
:mod:`rtllm.engine.kv_cache.block_hash`). A new request walks its prompt block by
block: a hash found in the device pool is taken by reference, one found in the
host tier is copied back into a fresh device block, and the walk stops at the
first miss. Every hit is confirmed against the stored parent hash and token ids.
At least one token is always left to compute, so the request has logits to sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtllm.engine.kv_cache.block_hash import BlockHash, block_extra_keys, hash_block
from rtllm.engine.kv_cache.block_pool import BlockPool, CachedBlock
from rtllm.engine.kv_cache.events import DEVICE_LEVEL, HOST_LEVEL, KVCacheEventBuffer
from rtllm.engine.kv_cache.host_cache import HostBlockCache, KVBlockCopier
from rtllm.engine.llm_request import LlmRequest


@dataclass(slots=True)
class KVCacheCounters:
    """Running totals since start-up (TensorRT-LLM's KV cache stats names, snake_case)."""

    alloc_total_blocks: int = 0  # blocks put into block tables, new or reused
    alloc_new_blocks: int = 0  # of those, freshly allocated
    reused_blocks: int = 0  # prefix-cache hits (device or host)
    missed_blocks: int = 0  # full prompt blocks looked up and not found
    onloaded_blocks: int = 0  # hits served from the host tier
    offloaded_blocks: int = 0  # evicted device blocks copied to the host tier

    @property
    def cache_hit_rate(self) -> float:
        looked_up = self.reused_blocks + self.missed_blocks
        return self.reused_blocks / looked_up if looked_up else 0.0


class KVCacheManager:
    """Owns every request's block table and the prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        tokens_per_block: int,
        enable_block_reuse: bool = False,
        host_cache_blocks: int = 0,
        copier: KVBlockCopier | None = None,
        events: KVCacheEventBuffer | None = None,
    ) -> None:
        if host_cache_blocks and not enable_block_reuse:
            raise ValueError("the host KV tier (host_cache_size) needs enable_block_reuse=True")
        if host_cache_blocks and copier is None:
            raise ValueError("the host KV tier needs a block copier")
        self.copier = copier
        self.tokens_per_block = tokens_per_block
        self.enable_block_reuse = enable_block_reuse
        self.pool = BlockPool(num_blocks, on_evict=self._on_evict)
        self.host = HostBlockCache(host_cache_blocks, copier) if host_cache_blocks else None
        self.events = events
        self.counters = KVCacheCounters()
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[BlockHash]] = {}  # hashes of a request's leading full blocks
        if events is not None:
            events.created([num_blocks, host_cache_blocks])

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocations, including evictable cached ones."""
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.tokens_per_block)

    def num_allocated_blocks(self, request_id: int) -> int:
        return len(self._tables.get(request_id, ()))

    def block_table(self, request_id: int) -> list[int]:
        return self._tables[request_id]

    # ---- allocation --------------------------------------------------------------------
    def allocate(self, request: LlmRequest, num_tokens: int) -> None:
        """Make sure ``request`` has blocks for its first ``num_tokens`` tokens."""
        table = self._tables.setdefault(request.request_id, [])
        missing = self.num_blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.pool.allocate(missing))
            self.counters.alloc_total_blocks += missing
            self.counters.alloc_new_blocks += missing

    def free(self, request_id: int) -> None:
        """Return every block of the request to the pool (idempotent).

        The table is freed tail first, so a request's last blocks (the least likely
        to be shared) are evicted before its first ones.
        """
        self._hashes.pop(request_id, None)
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(reversed(table))

    def fork(self, parent_id: int, child: LlmRequest) -> None:
        """Give ``child`` the KV of the parent's first ``child.num_computed_tokens`` tokens:
        full blocks shared by reference, a partly filled last block copied (the sequences
        write their own tokens into it)."""
        if self.copier is None:
            raise RuntimeError("forking sequences needs a block copier")
        if child.request_id in self._tables:
            raise RuntimeError(f"request {child.request_id} already holds KV blocks")
        parent = self._tables[parent_id]
        num_full = child.num_computed_tokens // self.tokens_per_block
        table = list(parent[:num_full])
        for block in table:
            self.pool.take(block)
        if child.num_computed_tokens % self.tokens_per_block:
            [copy] = self.pool.allocate(1)
            self.copier.copy_block(parent[num_full], copy)
            table.append(copy)
            self.counters.alloc_total_blocks += 1
            self.counters.alloc_new_blocks += 1
        self._tables[child.request_id] = table
        self._hashes[child.request_id] = list(self._hashes.get(parent_id, ()))[:num_full]

    def reassign(self, assignments: list[tuple[int, int]], num_tokens: int) -> None:
        """Beam search: for each ``(request, parent)``, ``request`` continues ``parent``'s
        sequence, whose first ``num_tokens`` tokens have KV. Full blocks are shared by
        reference; the partly filled last block goes to the first request continuing
        that parent and is copied for the others. Tables of parents that no request
        continues are released."""
        size = self.tokens_per_block
        num_full, partial = divmod(num_tokens, size)
        ids = {r for r, _ in assignments} | {p for _, p in assignments}
        old = {i: self._tables.pop(i, []) for i in ids}
        old_hashes = {i: self._hashes.pop(i, []) for i in ids}
        new: dict[int, list[int]] = {}
        fresh: set[int] = set()
        partial_taken: set[int] = set()
        for request_id, parent in assignments:
            source = old[parent]
            table = list(source[:num_full])
            if partial:
                if parent not in partial_taken:
                    partial_taken.add(parent)
                    table.append(source[num_full])
                else:
                    if self.copier is None:
                        raise RuntimeError("beam search needs a block copier")
                    [copy] = self.pool.allocate(1)
                    self.copier.copy_block(source[num_full], copy)
                    fresh.add(copy)
                    table.append(copy)
                    self.counters.alloc_total_blocks += 1
                    self.counters.alloc_new_blocks += 1
            new[request_id] = table
            self._hashes[request_id] = list(old_hashes[parent][:num_full])
        for table in new.values():
            for block in table:
                if block not in fresh:
                    self.pool.take(block)
        for table in old.values():
            self.pool.free(reversed(table))
        self._tables.update(new)

    # ---- prefix reuse ------------------------------------------------------------------
    def match_prefix(self, request: LlmRequest) -> int:
        """Give a request with nothing computed yet the cached blocks of its longest
        reusable prefix; advances ``num_computed_tokens`` and returns the tokens reused."""
        if not self.enable_block_reuse or request.num_computed_tokens or request.num_pending_tokens:
            return 0
        if self._tables.get(request.request_id):
            raise RuntimeError(f"request {request.request_id} already holds KV blocks")
        size = self.tokens_per_block
        table = self._tables.setdefault(request.request_id, [])
        hashes = self._hashes.setdefault(request.request_id, [])
        extra = block_extra_keys(cache_salt=request.cache_salt)
        num_full = (request.num_tokens - 1) // size  # keep >= 1 token to compute
        for index in range(num_full):
            parent = hashes[-1] if hashes else None
            tokens = tuple(request.tokens_slice(index * size, (index + 1) * size))
            block_hash = hash_block(parent, tokens, extra if index == 0 else b"")
            expected = CachedBlock(block_hash, parent, tokens)
            block = self._device_hit(expected)
            if block is None:
                block = self._host_hit(expected)
            if block is None:
                self.counters.missed_blocks += num_full - index
                break
            table.append(block)
            hashes.append(block_hash)
        reused = len(table)
        self.counters.reused_blocks += reused
        self.counters.alloc_total_blocks += reused
        request.num_computed_tokens = reused * size
        if not request.output_token_ids:
            request.num_cached_tokens = reused * size
        return reused * size

    def _device_hit(self, expected: CachedBlock) -> int | None:
        block = self.pool.lookup(expected.block_hash)
        if block is None or self.pool.cached(block) != expected:
            return None
        self.pool.take(block)
        return block

    def _host_hit(self, expected: CachedBlock) -> int | None:
        host = self.host
        if host is None:
            return None
        host_block = host.lookup(expected.block_hash)
        if (
            host_block is None
            or host.cached(host_block) != expected
            or not self.pool.num_free_blocks
        ):
            return None
        # Allocating may evict a device block into the host tier, which may drop the
        # host tier's oldest block: look the hash up again afterwards.
        host.touch(host_block)
        [block] = self.pool.allocate(1)
        host_block = host.lookup(expected.block_hash)
        if host_block is None:
            self.pool.free([block])
            return None
        host.load(host_block, block)
        self.pool.register(block, expected)
        self.counters.onloaded_blocks += 1
        self.counters.alloc_new_blocks += 1
        if self.events is not None:
            self.events.updated(expected.block_hash, HOST_LEVEL, DEVICE_LEVEL)
        return block

    def cache_full_blocks(self, request: LlmRequest) -> None:
        """Register the request's full blocks whose tokens are committed and computed."""
        if not self.enable_block_reuse:
            return
        table = self._tables.get(request.request_id)
        if not table:
            return
        size = self.tokens_per_block
        known = min(request.num_computed_tokens, request.num_tokens - request.num_pending_tokens)
        num_full = min(known // size, len(table))
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) >= num_full:
            return  # no block filled up since the last call (most steps of a decode)
        extra = block_extra_keys(cache_salt=request.cache_salt)
        stored: list[tuple[BlockHash, tuple[int, ...]]] = []
        stored_parent: BlockHash | None = None
        for index in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            tokens = tuple(request.tokens_slice(index * size, (index + 1) * size))
            block_hash = hash_block(parent, tokens, extra if index == 0 else b"")
            hashes.append(block_hash)
            if self.pool.register(table[index], CachedBlock(block_hash, parent, tokens)):
                if not stored:
                    stored_parent = parent
                stored.append((block_hash, tokens))
            elif stored:  # a block someone else registered first breaks the chain of events
                self._emit_stored(stored_parent, stored)
                stored = []
        if stored:
            self._emit_stored(stored_parent, stored)

    def _emit_stored(
        self, parent: BlockHash | None, blocks: list[tuple[BlockHash, tuple[int, ...]]]
    ) -> None:
        if self.events is not None:
            self.events.stored(parent, blocks)

    def _on_evict(self, block: int, cached: CachedBlock) -> None:
        """A cached device block is about to be overwritten: offload it or report it gone."""
        if self.host is None:
            if self.events is not None:
                self.events.removed([cached.block_hash])
            return
        dropped = self.host.store(block, cached)
        self.counters.offloaded_blocks += 1
        if self.events is not None:
            self.events.updated(cached.block_hash, DEVICE_LEVEL, HOST_LEVEL)
            if dropped is not None and self.pool.lookup(dropped.block_hash) is None:
                self.events.removed([dropped.block_hash])
