"""Paged KV cache bookkeeping (pure Python; the tensors live in the runner)."""

from rtllm.engine.kv_cache.block_pool import BlockPool, CachedBlock, OutOfBlocksError
from rtllm.engine.kv_cache.events import KVCacheEventBuffer
from rtllm.engine.kv_cache.host_cache import HostBlockCache, KVBlockCopier
from rtllm.engine.kv_cache.kv_cache_manager import KVCacheCounters, KVCacheManager

__all__ = [
    "BlockPool",
    "CachedBlock",
    "HostBlockCache",
    "KVBlockCopier",
    "KVCacheCounters",
    "KVCacheEventBuffer",
    "KVCacheManager",
    "OutOfBlocksError",
]
