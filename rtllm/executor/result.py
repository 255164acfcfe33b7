"""The handle a caller gets for a submitted request: awaitable, iterable, streamable.

The engine thread pushes :class:`Response` deltas into a thread-safe queue; the
caller's thread applies them one at a time, so ``text_diff``/``token_ids_diff``
always describe exactly one delta and all state is touched by the caller only.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class RequestError(RuntimeError):
    """A request failed inside the engine (the engine itself goes on)."""


class Logprob(NamedTuple):
    """A token's log-probability and its rank in the step's distribution (1 = likeliest)."""

    logprob: float
    rank: int | None = None


TokenLogprobs = list[dict[int, Logprob]]
"""Per position: the chosen token's logprob first, then the top alternatives."""


@dataclass(slots=True)
class Response:
    """One delta from the engine thread to a result (for output ``index``)."""

    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    index: int = 0
    logprobs: TokenLogprobs | None = None  # one entry per token of the delta
    cumulative_logprob: float | None = None
    generation_logits: Any = None  # torch.Tensor [len(token_ids), vocab]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first delta; [0] is None
    context_logits: Any = None  # torch.Tensor [prompt_len, vocab], with the first delta
    request_finished: bool | None = None  # None: same as ``finished`` (one output per request)


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request.

    Attributes:
        index: Index of the sequence within the request.
        text: Generated text so far.
        token_ids: Generated token ids so far.
        finish_reason: "stop", "length", "cancelled", "error" or None while running.
        stop_reason: The stop string or stop token id that ended it, if any.
        text_diff: Text added by the latest delta (streaming).
        token_ids_diff: Token ids added by the latest delta (streaming).
        logprobs: With ``SamplingParams.logprobs``: per generated token, a dict from token
            id to :class:`Logprob` (the generated token first, then the top alternatives).
        logprobs_diff: The entries of ``logprobs`` added by the latest delta.
        cumulative_logprob: Sum of the generated tokens' logprobs (when computed).
        generation_logits: With ``return_generation_logits``: float32 ``[len, vocab]``.
    """

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_diff: str = ""
    token_ids_diff: list[int] = field(default_factory=list)
    logprobs: TokenLogprobs | None = None
    logprobs_diff: TokenLogprobs = field(default_factory=list)
    cumulative_logprob: float | None = None
    generation_logits: Any = None

    @property
    def length(self) -> int:
        return len(self.token_ids)


class GenerationResult:
    """Result of one request (TensorRT-LLM's ``RequestOutput``).

    Use ``result.result()`` (blocking), ``await result``, ``for out in result`` or
    ``async for out in result``; iteration yields the result itself after each
    delta. ``abort()`` cancels the request.
    """

    def __init__(
        self,
        request_id: int,
        prompt: str | None,
        prompt_token_ids: list[int],
        abort_fn: Callable[[int], None],
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput()]
        # With SamplingParams.prompt_logprobs: per prompt token (None for the first one).
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.context_logits: Any = None  # torch.Tensor [prompt_len, vocab] when asked for
        self.finished = False
        self.error: str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self._abort_fn = abort_fn
        self._queue: queue.SimpleQueue[Response] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # ---- producer side (engine thread) -------------------------------------------------
    def _push(self, response: Response) -> None:
        push_responses([(self, response)])

    # ---- consumer side ---------------------------------------------------------------
    def _apply(self, response: Response) -> None:
        while len(self.outputs) <= response.index:
            self.outputs.append(CompletionOutput(index=len(self.outputs)))
        for other in self.outputs:  # diffs describe the latest delta only
            other.token_ids_diff, other.text_diff, other.logprobs_diff = [], "", []
        out = self.outputs[response.index]
        out.token_ids_diff = response.token_ids
        out.text_diff = response.text
        out.token_ids.extend(response.token_ids)
        out.text += response.text
        if response.logprobs is not None:
            out.logprobs_diff = response.logprobs
            out.logprobs = (out.logprobs or []) + response.logprobs
        if response.cumulative_logprob is not None:
            out.cumulative_logprob = response.cumulative_logprob
        if response.generation_logits is not None:
            import torch

            previous = out.generation_logits
            logits = response.generation_logits
            out.generation_logits = logits if previous is None else torch.cat([previous, logits])
        if response.prompt_logprobs is not None:
            self.prompt_logprobs = response.prompt_logprobs
        if response.context_logits is not None:
            self.context_logits = response.context_logits
        if response.token_ids and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if response.finished:
            out.finish_reason = response.finish_reason
            out.stop_reason = response.stop_reason
        request_finished = response.finished if response.request_finished is None else response.request_finished
        if request_finished:
            self.finished = True
            self.error = response.error
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RequestError(f"request {self.request_id} failed: {self.error}")

    def abort(self) -> None:
        """Cancel the request; it finishes with ``finish_reason == "cancelled"``."""
        if not self.finished:
            self._abort_fn(self.request_id)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; returns ``self``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                response = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s") from None
            self._apply(response)
        self._raise_if_failed()
        return self

    def __iter__(self) -> Iterator[GenerationResult]:
        while not self.finished:
            self._apply(self._queue.get())
            yield self

    async def _next_response(self) -> Response:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        assert self._event is not None
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            self._event.clear()
            # Re-check after clearing: a push between the first check and the clear
            # has set the event already, and must not be missed.
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                await self._event.wait()

    async def aresult(self) -> GenerationResult:
        """Wait (asynchronously) until the request finishes; returns ``self``."""
        while not self.finished:
            self._apply(await self._next_response())
        self._raise_if_failed()
        return self

    def __await__(self) -> Generator[Any, None, GenerationResult]:
        return self.aresult().__await__()

    async def __aiter__(self) -> AsyncIterator[GenerationResult]:
        while not self.finished:
            self._apply(await self._next_response())
            yield self

    def __repr__(self) -> str:
        out = self.outputs[0]
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"text={out.text!r}, finish_reason={out.finish_reason!r})"
        )


def push_responses(deliveries: Iterable[tuple[GenerationResult, Response]]) -> None:
    """Queue each response on its result (engine side), then wake the asyncio consumers.

    Each event loop is woken by one thread-safe call for the whole batch: a
    ``call_soon_threadsafe`` writes to the loop's self-pipe, and one write per
    response cost the engine thread a quarter of its time at 512 streams.
    Blocking consumers (``result()``, ``for out in result``) wait on the queue itself.
    """
    events_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for result, response in deliveries:
        result._queue.put(response)
        # Read after the put: a consumer that sets its loop later re-checks the queue.
        loop, event = result._loop, result._event
        if loop is not None and event is not None:
            events_by_loop.setdefault(loop, []).append(event)
    for loop, events in events_by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the caller's event loop is closed; nobody is waiting
            pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()
