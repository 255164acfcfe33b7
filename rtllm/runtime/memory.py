"""Memory planning: weights, activations, CUDA graphs and the KV block pool.

A quantized KV cache (int8 / float8_e4m3fn, :mod:`rtllm.kernels.kv_quant`) takes one
byte per element plus a float32 scale per (K or V, token, KV head): for the same
bytes it holds ``2 * head_dim / (head_dim + 4)`` times the tokens of a 16-bit cache
(1.88x for head_dim 64, 1.94x for 128). Block counts are sized from those bytes;
``KvCacheConfig.max_tokens`` still counts tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rtllm.kernels.kv_quant import kv_bytes_per_token_layer_head
from rtllm.llmapi.llm_args import KvCacheConfig
from rtllm.models.config import ModelConfig

logger = logging.getLogger(__name__)

# On CPU there is no "free device memory" to share out; the pool is capped here.
CPU_KV_CACHE_BYTES = 2**30
GiB = 2**30


def kv_bytes_per_block(
    config: ModelConfig,
    tokens_per_block: int,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype | None = None,
) -> int:
    """Bytes one KV block takes over all layers (``kv_cache_dtype``: the cache's element
    type when it is not the model ``dtype``; scales of a quantized cache included)."""
    per_head = kv_bytes_per_token_layer_head(config.head_dim, kv_cache_dtype or dtype)
    return config.num_hidden_layers * config.num_key_value_heads * tokens_per_block * per_head


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """What the GPU memory is spent on (bytes)."""

    weights: int
    activations: int
    cuda_graphs: int
    kv_cache: int
    num_blocks: int

    def describe(self) -> str:
        return (
            f"weights {self.weights / GiB:.2f} GiB, activations {self.activations / GiB:.2f} GiB, "
            f"CUDA graphs (reserved) {self.cuda_graphs / GiB:.2f} GiB, KV cache {self.kv_cache / GiB:.2f} GiB "
            f"({self.num_blocks} blocks)"
        )


def check_weights_fit(num_weight_bytes: int, device: torch.device) -> None:
    """Raise a clear error before loading a model that cannot fit on ``device``."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if num_weight_bytes > free:
        raise ValueError(
            f"the model's weights need {num_weight_bytes / GiB:.2f} GiB but only {free / GiB:.2f} GiB of "
            f"{total / GiB:.2f} GiB GPU memory is free on {device}; use a smaller model or dtype"
        )


def num_kv_blocks(
    config: ModelConfig,
    kv_config: KvCacheConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int,
    max_batch_size: int,
    reserved_bytes: int = 0,
    kv_cache_dtype: torch.dtype | None = None,
) -> int:
    """Number of KV blocks to allocate.

    ``kv_config.max_tokens`` wins when given; otherwise on CUDA the pool takes
    ``free_gpu_memory_fraction`` of the free memory left after ``reserved_bytes``
    (activations and CUDA graphs), and on CPU enough for ``max_batch_size`` full
    sequences capped at :data:`CPU_KV_CACHE_BYTES`. Raises if not even one
    sequence of ``max_seq_len`` tokens fits. ``kv_cache_dtype`` is the element type of
    a quantized cache (blocks are then smaller, so more fit).
    """
    tokens_per_block = kv_config.tokens_per_block
    per_block = kv_bytes_per_block(config, tokens_per_block, dtype, kv_cache_dtype)
    min_blocks = -(-max_seq_len // tokens_per_block)
    if kv_config.max_tokens is not None:
        num_blocks = -(-kv_config.max_tokens // tokens_per_block)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num_blocks = int(max(0, free - reserved_bytes) * kv_config.free_gpu_memory_fraction) // per_block
    else:
        wanted = -(-max_batch_size * max_seq_len // tokens_per_block)
        num_blocks = max(min_blocks, min(wanted, CPU_KV_CACHE_BYTES // per_block))
    if num_blocks < min_blocks:
        raise ValueError(
            f"the KV cache holds {num_blocks * tokens_per_block} tokens, fewer than max_seq_len="
            f"{max_seq_len}; raise kv_cache_config.max_tokens / free_gpu_memory_fraction or lower max_seq_len"
        )
    return num_blocks
