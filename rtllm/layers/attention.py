"""The attention module models use; the work is done by the step's backend.

``KV_CACHE_QUANT_ALGOS`` advertises the KV-cache quantizations every backend supports
(``QuantConfig.kv_cache_quant_algo``; read by
:func:`rtllm.quantization.checkpoint.kv_cache_quant_supported`): int8 and FP8 E4M3
codes with per-(token, KV head) scales, see :mod:`rtllm.kernels.kv_quant`.
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.layers.attention_backends.base import AttentionLayerSpec
from rtllm.runtime.forward_context import get_forward_context

KV_CACHE_QUANT_ALGOS: tuple[str, ...] = ("INT8", "FP8")


class Attention(nn.Module):
    """Paged causal attention of layer ``layer_idx`` over the step's packed batch."""

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = AttentionLayerSpec(num_heads, num_kv_heads, head_dim, scale, sliding_window)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query`` ``[T, H, D]``, ``key``/``value`` ``[T, Hkv, D]`` -> ``[T, H, D]``."""
        context = get_forward_context()
        return context.backend.forward(
            self.spec, query, key, value, context.kv_caches[self.layer_idx], context.attn_metadata
        )
