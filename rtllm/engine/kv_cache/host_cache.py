"""The host tier: reusable KV blocks evicted from the device pool, kept in host memory.

When the device pool evicts a cached block, its KV is copied into a host block
(pinned memory on CUDA) instead of being lost; a later prefix hit on that hash
copies it back into a device block instead of recomputing it. The host tier is an
LRU of its own: when full, its oldest block is dropped. On a CPU-only machine both
tiers are ordinary memory and the tier works the same (a second, slower pool).

The copies themselves are the model runner's job (it owns the KV tensors), behind
the :class:`KVBlockCopier` protocol; on CUDA they are queued on the compute stream,
so they are ordered with the forward passes that write and read those blocks.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol

from rtllm.engine.kv_cache.block_hash import BlockHash
from rtllm.engine.kv_cache.block_pool import CachedBlock


class KVBlockCopier(Protocol):
    """Moves one block's KV (all layers) between the device pool and the host tier, or
    within the device pool (copy-on-write of a block shared by forked sequences)."""

    def offload(self, device_block: int, host_block: int) -> None: ...

    def onload(self, host_block: int, device_block: int) -> None: ...

    def copy_block(self, src_block: int, dst_block: int) -> None: ...


class HostBlockCache:
    """``num_blocks`` host blocks holding reusable KV, evicted least recently used first."""

    def __init__(self, num_blocks: int, copier: KVBlockCopier) -> None:
        if num_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.copier = copier
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # used host blocks, oldest first
        self._cached: list[CachedBlock | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}

    @property
    def num_used_blocks(self) -> int:
        return len(self._lru)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._by_hash.get(block_hash)

    def cached(self, host_block: int) -> CachedBlock | None:
        return self._cached[host_block]

    def lru_blocks(self) -> list[int]:
        """Used host blocks, the next to be dropped first."""
        return list(self._lru)

    def store(self, device_block: int, cached: CachedBlock) -> CachedBlock | None:
        """Copy a device block's KV in (unless already held); returns what was dropped
        to make room, if anything."""
        existing = self._by_hash.get(cached.block_hash)
        if existing is not None:
            self._lru.move_to_end(existing)
            return None
        dropped = None
        if self._free:
            host_block = self._free.popleft()
        else:
            host_block, _ = self._lru.popitem(last=False)
            dropped = self._cached[host_block]
            assert dropped is not None
            del self._by_hash[dropped.block_hash]
        self.copier.offload(device_block, host_block)
        self._cached[host_block] = cached
        self._by_hash[cached.block_hash] = host_block
        self._lru[host_block] = None
        return dropped

    def touch(self, host_block: int) -> None:
        """Make ``host_block`` the most recently used (the last to be dropped)."""
        self._lru.move_to_end(host_block)

    def load(self, host_block: int, device_block: int) -> None:
        """Copy a host block's KV into ``device_block``; the host copy stays (most recent)."""
        if self._cached[host_block] is None:
            raise ValueError(f"host KV block {host_block} holds nothing")
        self.copier.onload(host_block, device_block)
        self._lru.move_to_end(host_block)
