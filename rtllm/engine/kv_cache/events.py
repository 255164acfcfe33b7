"""KV cache events: what blocks an engine holds, for external routers.

Events follow TensorRT-LLM's shapes: ``{"event_id": n, "data": {"type": ...}}``
with types ``created`` (pool sizes per cache level), ``stored`` (new reusable
blocks: hash, token ids, parent hash), ``removed`` (hashes no longer held at any
level) and ``updated`` (a block moved between cache levels: 0 = device, 1 = host).

The engine thread produces events; any thread reads them. The buffer keeps the
newest ``max_size`` events (older ones are dropped when nobody reads them).
"""

from __future__ import annotations

from typing import Any

from rtllm.engine.drain_buffer import DrainBuffer

DEVICE_LEVEL = 0
HOST_LEVEL = 1


class KVCacheEventBuffer:
    """A bounded, thread-safe queue of KV cache events."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"event_buffer_max_size must be >= 1, got {max_size}")
        self._buffer: DrainBuffer[dict[str, Any]] = DrainBuffer(max_size)
        self._next_id = 0  # written by the engine thread only

    def _add(self, data: dict[str, Any]) -> None:
        self._buffer.put({"event_id": self._next_id, "data": data})
        self._next_id += 1

    def created(self, num_blocks_per_cache_level: list[int]) -> None:
        self._add(
            {"type": "created", "num_blocks_per_cache_level": list(num_blocks_per_cache_level)}
        )

    def stored(self, parent_hash: int | None, blocks: list[tuple[int, tuple[int, ...]]]) -> None:
        """``blocks``: consecutive (hash, token ids) pairs, the first a child of ``parent_hash``."""
        self._add(
            {
                "type": "stored",
                "parent_hash": parent_hash,
                "blocks": [
                    {"block_hash": h, "token_ids": list(tokens), "cache_level": DEVICE_LEVEL}
                    for h, tokens in blocks
                ],
            }
        )

    def removed(self, block_hashes: list[int]) -> None:
        self._add({"type": "removed", "block_hashes": list(block_hashes)})

    def updated(self, block_hash: int, old_level: int, new_level: int) -> None:
        self._add(
            {
                "type": "updated",
                "block_hash": block_hash,
                "cache_level": {"old_value": old_level, "new_value": new_level},
            }
        )

    def get(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Take every buffered event, waiting up to ``timeout`` seconds for the first."""
        return self._buffer.drain(timeout)
