"""The attention backend interface.

KV cache layout (shared by every backend): one tensor per layer of shape
``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``; index 0 holds K,
index 1 holds V. Token ``i`` of a sequence lives in block
``block_table[i // tokens_per_block]`` at offset ``i % tokens_per_block``; its
*slot* is ``block * tokens_per_block + offset``.

Quantized KV cache (``QuantConfig(kv_cache_quant_algo=INT8 | FP8)``): a layer's cache is
then a :class:`~rtllm.kernels.kv_quant.QuantizedKVCache` ``(data, scale)``, ``data`` in
the layout above as int8 / float8_e4m3fn codes and ``scale`` float32
``[2, num_blocks, tokens_per_block, num_kv_heads]``, one scale per (K or V, token, KV
head) computed when the token is written (see :mod:`rtllm.kernels.kv_quant`). Backends
quantize on write and dequantize on read; queries and outputs stay in the model dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from rtllm.kernels.kv_quant import KVCacheLayer, QuantizedKVCache


@dataclass(frozen=True, slots=True)
class AttentionLayerSpec:
    """Static facts about one attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None


@dataclass(slots=True)
class StepAttentionInputs:
    """Host-side description of one packed step, from which backends build metadata.

    Sequences are packed one after another in the step's token order; sequence
    ``i`` contributes ``query_lens[i]`` new tokens whose KV goes after
    ``context_lens[i]`` tokens already in the cache.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    tokens_per_block: int
    device: torch.device

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens, strict=True)]

    @property
    def fresh_prompt_start(self) -> int:
        """Index of the first of the trailing sequences with no cached prefix (prompts
        whose every key is this step's own), ``len(query_lens)`` when there are none.
        The scheduler places running generations before new prompts, so in a mixed step
        these are the step's new prompts. The Triton backend attends over their fresh
        K/V in the model dtype rather than over the cache it writes (as TensorRT-LLM's
        context FMHA and vLLM's prefill do; later steps read the cache), where the
        torch backend, the reference emulation of a quantized cache, always reads the
        codes."""
        start = len(self.context_lens)
        while start and self.context_lens[start - 1] == 0:
            start -= 1
        return start


class AttentionBackend(ABC):
    """Computes paged attention for a packed batch of variable-length sequences."""

    name: str

    @abstractmethod
    def build_metadata(self, inputs: StepAttentionInputs) -> Any:
        """Build the device-side metadata for one step (once, shared by all layers)."""

    @abstractmethod
    def forward(
        self,
        spec: AttentionLayerSpec,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCacheLayer,
        metadata: Any,
    ) -> torch.Tensor:
        """Store ``key``/``value`` into ``kv_cache`` and attend.

        Args:
            query: ``[num_tokens, num_heads, head_dim]``.
            key, value: ``[num_tokens, num_kv_heads, head_dim]``.
            kv_cache: this layer's cache: a tensor, or a ``QuantizedKVCache`` (layouts in
                the module docstring).

        Returns:
            ``[num_tokens, num_heads, head_dim]``.
        """


__all__ = [
    "AttentionBackend",
    "AttentionLayerSpec",
    "KVCacheLayer",
    "QuantizedKVCache",
    "StepAttentionInputs",
]
