"""Triton kernels, each with a typed launcher and a PyTorch reference beside it.

Layers reach the fused kernels through :func:`fused_kernel`, which imports them
lazily: ``import rtllm`` works without Triton, and CPU runs never touch it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any


@functools.cache
def fused_kernel(module: str, name: str) -> Callable[..., Any] | None:
    """``rtllm.kernels.<module>.<name>``, or None when Triton is not importable."""
    try:
        return getattr(importlib.import_module(f"rtllm.kernels.{module}"), name)
    except ImportError:
        return None
