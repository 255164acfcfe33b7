"""Paged KV cache bookkeeping (pure Python; the tensors live in the runner)."""

from rtllm.engine.kv_cache.block_pool import BlockPool, OutOfBlocksError
from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager", "OutOfBlocksError"]
