"""Content hashes of full KV blocks, chained over the prefix.

A block's hash covers its parent's hash, its own token ids and any extra keys
(LoRA adapter id, per-tenant ``cache_salt``), so two blocks share a hash only if
their whole prefix matches. The hash is deterministic across processes (blake2b,
not Python's salted ``hash``), so an external router can compare the hashes that
several engines report in their KV cache events.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = int
"""A 64-bit unsigned content hash of a block and its whole prefix."""


def block_extra_keys(lora_id: int | None = None, cache_salt: str | None = None) -> bytes:
    """Bytes mixed into the first block's hash: requests with different keys never share KV."""
    if lora_id is None and cache_salt is None:
        return b""
    return f"lora={lora_id};salt={cache_salt}".encode()


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: bytes = b""
) -> BlockHash:
    """Hash of a full block: ``parent`` is None for a sequence's first block."""
    digest = hashlib.blake2b(digest_size=8)
    # A leading flag keeps "no parent" apart from a parent whose hash is 0.
    digest.update(b"\x00" if parent is None else b"\x01" + parent.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    if extra_keys:
        digest.update(extra_keys)
    return int.from_bytes(digest.digest(), "little")
