"""A pool of fixed-size KV blocks with reference counts.

Blocks are identified by their index into the KV tensors. A block is *free*
when its reference count is 0; free blocks are handed out oldest-freed first
(a FIFO), which keeps allocation O(1) and leaves room for a later LRU of
reusable blocks.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Raised when more blocks are asked for than are free."""


class BlockPool:
    """Reference-counted pool of ``num_blocks`` KV blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num: int) -> list[int]:
        """Take ``num`` free blocks (each then has reference count 1)."""
        if num < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num})")
        if num > len(self._free):
            raise OutOfBlocksError(f"asked for {num} KV blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 return to the pool."""
        for block in block_ids:
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"KV block id {block} is outside [0, {self.num_blocks})")
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"KV block {block} freed more often than allocated")
            self._ref_counts[block] = count - 1
            if count == 1:
                self._free.append(block)
