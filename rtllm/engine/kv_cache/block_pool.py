"""A pool of fixed-size KV blocks with reference counts and a reusable-block LRU.

Blocks are identified by their index into the KV tensors. Every block is in
exactly one of three places:

* *referenced* (ref count >= 1): in the block table of at least one request;
* *fresh*: free and holding nothing worth keeping;
* *cached*: free but holding the KV of a full block with a known hash, kept in an
  LRU queue so a later request with the same prefix can take it back.

Allocation takes fresh blocks first and evicts cached blocks oldest-first only
when no fresh block is left. Fresh blocks are handed out in the order they were
freed, and a new pool hands out ids 0, 1, 2, ..., so the blocks ever used always
form a prefix ``[0, k)`` of the ids (the model runner zeroes blocks lazily on
that assumption).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rtllm.engine.kv_cache.block_hash import BlockHash


class OutOfBlocksError(RuntimeError):
    """Raised when more blocks are asked for than are free."""


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """What a reusable block holds: its chained hash, its parent's hash and its tokens."""

    block_hash: BlockHash
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]


EvictCallback = Callable[[int, CachedBlock], None]


class BlockPool:
    """Reference-counted pool of ``num_blocks`` KV blocks with prefix-cache bookkeeping.

    ``on_evict(block_id, cached)`` runs when a cached block is about to be reused
    for other data, while it still holds its KV (the host tier copies it out then).
    """

    def __init__(self, num_blocks: int, on_evict: EvictCallback | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        self._fresh: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached free blocks, oldest first
        self._cached: list[CachedBlock | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}

    # ---- views -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take (fresh plus evictable cached)."""
        return len(self._fresh) + len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._lru)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def cached(self, block_id: int) -> CachedBlock | None:
        """What ``block_id`` holds for reuse, or None."""
        return self._cached[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding ``block_hash`` (referenced or free), or None."""
        return self._by_hash.get(block_hash)

    def fresh_blocks(self) -> list[int]:
        return list(self._fresh)

    def lru_blocks(self) -> list[int]:
        """Cached free blocks, the next to be evicted first."""
        return list(self._lru)

    # ---- changes -----------------------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        """Take ``num`` free blocks (each then has reference count 1 and holds nothing)."""
        if num < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num})")
        if num > self.num_free_blocks:
            raise OutOfBlocksError(f"asked for {num} KV blocks, only {self.num_free_blocks} free")
        blocks = []
        for _ in range(num):
            block = self._fresh.popleft() if self._fresh else self._evict_oldest()
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def _evict_oldest(self) -> int:
        block, _ = self._lru.popitem(last=False)
        cached = self._cached[block]
        assert cached is not None
        if self.on_evict is not None:
            self.on_evict(block, cached)
        self._cached[block] = None
        del self._by_hash[cached.block_hash]
        return block

    def take(self, block_id: int) -> None:
        """Add a reference to a cached block (a prefix-cache hit) or to a referenced one
        (sequences of one prompt sharing its blocks)."""
        if self._cached[block_id] is None and self._ref_counts[block_id] == 0:
            raise ValueError(f"KV block {block_id} holds no reusable KV")
        if self._ref_counts[block_id] == 0:
            del self._lru[block_id]
        self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block reaching 0 becomes cached (if it
        holds reusable KV, as the LRU's newest entry) or fresh."""
        for block in block_ids:
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"KV block id {block} is outside [0, {self.num_blocks})")
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"KV block {block} freed more often than allocated")
            self._ref_counts[block] = count - 1
            if count == 1:
                if self._cached[block] is not None:
                    self._lru[block] = None
                else:
                    self._fresh.append(block)

    def register(self, block_id: int, cached: CachedBlock) -> bool:
        """Mark a referenced, full block as reusable under ``cached.block_hash``.

        Returns False (and changes nothing) when another block already holds that
        hash: two requests computed the same block at once; the first one is kept.
        """
        if self._ref_counts[block_id] < 1:
            raise RuntimeError(
                f"KV block {block_id} is not referenced; only live blocks are registered"
            )
        if cached.block_hash in self._by_hash or self._cached[block_id] is not None:
            return False
        self._cached[block_id] = cached
        self._by_hash[cached.block_hash] = block_id
        return True
