"""A bounded, thread-safe buffer that one thread fills and readers drain."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class DrainBuffer(Generic[T]):
    """Keeps the newest ``max_size`` items (older ones drop when nobody reads them)."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"buffer size must be >= 1, got {max_size}")
        self._items: deque[T] = deque(maxlen=max_size)
        self._ready = threading.Condition()

    def put(self, item: T) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()

    def drain(self, timeout: float | None = None) -> list[T]:
        """Take every buffered item, waiting up to ``timeout`` seconds (None: forever)
        for the first; returns an empty list on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._ready.wait(remaining)
            items = list(self._items)
            self._items.clear()
            return items
