"""OpenAI-compatible HTTP server over one shared :class:`rtllm.LLM` (``rtllm serve``).

The package is imported by the ``rtllm`` command line for its argument parser, so
this module stays light: FastAPI, uvicorn and prometheus-client are only imported
when :func:`build_app` is used or a server is started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtllm.serve.app import build_app

__all__ = ["DEFAULT_STALL_TIMEOUT_S", "build_app"]

DEFAULT_STALL_TIMEOUT_S = 60.0
"""``/health`` answers 503 once the engine has not finished a step for this long with work queued."""


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from rtllm.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
