"""Rotary position embedding (Hugging Face's rotate-half layout), with Llama 3 scaling.

On CUDA (when Triton imports) q and k are rotated by one launch of the Triton kernel
of :mod:`rtllm.kernels.rotary` (float32 math, reading the float32 cos/sin caches
directly); elsewhere the PyTorch code below, whose numerics match Hugging Face's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rtllm.kernels import fused_kernel

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)




def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the
    # band in between is interpolated smoothly.
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k at given absolute positions."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if rope_scaling is not None:
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        # Cache cos and sin of [max_position, head_dim / 2] in float32 (exact as HF's).
        self.register_buffer("cos_cached", freqs.cos(), persistent=False)
        self.register_buffer("sin_cached", freqs.sin(), persistent=False)
        # One module serves every layer; all layers of a step pass the same positions
        # tensor, so cos/sin are looked up once per step rather than once per layer.
        self._last_positions: torch.Tensor | None = None
        self._last_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query`` ``[T, H, D]`` and ``key`` ``[T, Hkv, D]`` at ``positions`` ``[T]``."""
        if self._use_kernel(positions, query, key):
            kernel = fused_kernel("rotary", "rotary_embedding")
            if kernel is not None:
                return kernel(positions, query, key, self.cos_cached, self.sin_cached)
        if positions is not self._last_positions or self._last_cos_sin is None:
            cos = self.cos_cached.index_select(0, positions).to(query.dtype).unsqueeze(1)
            sin = self.sin_cached.index_select(0, positions).to(query.dtype).unsqueeze(1)
            self._last_positions, self._last_cos_sin = positions, (cos, sin)
        cos, sin = self._last_cos_sin
        return _rotate(query, cos, sin), _rotate(key, cos, sin)

    def _use_kernel(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> bool:
        return (
            query.is_cuda
            and self.cos_cached.is_cuda
            and query.dim() == 3
            and key.dim() == 3
            and query.dtype in _KERNEL_DTYPES
            and key.dtype == query.dtype
            and query.stride(-1) == 1
            and key.stride(-1) == 1
            and positions.dtype in (torch.int32, torch.int64)
        )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
