"""Per-request block tables over a :class:`BlockPool`.

Blocks are allocated lazily, as a request's computed tokens grow; admission
control (whether a request may start at all) is the capacity scheduler's job,
which asks :meth:`KVCacheManager.num_blocks_for` how much a request will need.
"""

from __future__ import annotations

from rtllm.engine.kv_cache.block_pool import BlockPool
from rtllm.engine.llm_request import LlmRequest


class KVCacheManager:
    """Owns every request's block table."""

    def __init__(self, num_blocks: int, tokens_per_block: int) -> None:
        self.tokens_per_block = tokens_per_block
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.tokens_per_block)

    def num_allocated_blocks(self, request_id: int) -> int:
        return len(self._tables.get(request_id, ()))

    def block_table(self, request_id: int) -> list[int]:
        return self._tables[request_id]

    def allocate(self, request: LlmRequest, num_tokens: int) -> None:
        """Make sure ``request`` has blocks for its first ``num_tokens`` tokens."""
        table = self._tables.setdefault(request.request_id, [])
        missing = self.num_blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.pool.allocate(missing))

    def free(self, request_id: int) -> None:
        """Return every block of the request to the pool (idempotent)."""
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table)
