"""Attention backends: ``torch`` (reference, any device) and, on CUDA, ``triton``."""

from __future__ import annotations

from rtllm.layers.attention_backends.base import (
    AttentionBackend,
    AttentionLayerSpec,
    StepAttentionInputs,
)
from rtllm.layers.attention_backends.torch_backend import TorchAttentionBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}


def get_attention_backend(name: str) -> AttentionBackend:
    """Instantiate the attention backend called ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]()


__all__ = [
    "AttentionBackend",
    "AttentionLayerSpec",
    "StepAttentionInputs",
    "TorchAttentionBackend",
    "get_attention_backend",
]
