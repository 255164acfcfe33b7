"""The queue of requests waiting for admission: higher priority first, FCFS within one.

A request keeps its arrival number for life, so a request paused under
MAX_UTILIZATION and put back goes ahead of everything that arrived after it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from rtllm.engine.llm_request import LlmRequest


class WaitingQueue:
    """Requests ordered by ``(-priority, arrival)``."""

    def __init__(self) -> None:
        self._items: list[tuple[float, int, LlmRequest]] = []
        self._arrival: dict[int, int] = {}  # request id -> arrival number
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[LlmRequest]:
        return (item[2] for item in self._items)

    def push(self, request: LlmRequest) -> None:
        arrival = self._arrival.setdefault(request.request_id, next(self._counter))
        # Keys are unique (arrival numbers are), so requests themselves are never compared.
        bisect.insort(self._items, (-request.priority, arrival, request), key=lambda item: item[:2])

    def peek(self) -> LlmRequest:
        return self._items[0][2]

    def pop(self) -> LlmRequest:
        return self._items.pop(0)[2]

    def remove(self, request: LlmRequest) -> bool:
        """Take ``request`` out of the queue (if there) and forget its arrival number."""
        self._arrival.pop(request.request_id, None)
        for index, item in enumerate(self._items):
            if item[2] is request:
                del self._items[index]
                return True
        return False
