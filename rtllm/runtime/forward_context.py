"""Per-step state that every attention layer reads: metadata and KV cache tensors.

The runner builds the metadata once per step and enters :func:`forward_context`
around the model's forward, so model code keeps Hugging Face's
``forward(input_ids, positions)`` signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rtllm.layers.attention_backends.base import AttentionBackend


@dataclass(slots=True)
class ForwardContext:
    """What attention layers need during one forward pass."""

    backend: AttentionBackend
    attn_metadata: Any
    kv_caches: list[torch.Tensor]


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("rtllm_forward_context", default=None)


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``context`` current for the forward pass run inside the block."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def get_forward_context() -> ForwardContext:
    """The context of the forward pass in progress; raises outside one."""
    context = _CURRENT.get()
    if context is None:
        raise RuntimeError("attention layer called outside rtllm.runtime.forward_context()")
    return context
