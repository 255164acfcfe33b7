"""The bridge between HTTP handlers and the shared engine.

:class:`ServingContext` tokenizes, submits and tracks requests on the one
:class:`rtllm.LLM` of the server; :class:`Generation` is one submitted prompt,
iterated as :class:`Delta` snapshots and always closed (aborted if unfinished, so a
client that goes away frees its KV blocks at the next engine step).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rtllm.executor.result import GenerationResult, RequestError
from rtllm.sampling_params import SamplingParams
from rtllm.serve.errors import OpenAIError, from_validation_error, invalid
from rtllm.serve.metrics import RequestTimer, ServerMetrics
from rtllm.serve.protocol import UsageInfo
from rtllm.serve.sampling import check_model, check_unsupported

if TYPE_CHECKING:
    from rtllm.llmapi.llm import LLM

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass(slots=True)
class Prompt:
    """A tokenized prompt; ``text`` is the prompt as text (for ``echo``), if known."""

    token_ids: list[int]
    text: str | None = None


@dataclass(slots=True)
class Delta:
    """What one engine update added to one generation (a snapshot)."""

    index: int
    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


class Generation:
    """One prompt submitted to the engine, with its metrics timer."""

    def __init__(self, index: int, prompt: Prompt, result: GenerationResult, timer: RequestTimer) -> None:
        self.index = index
        self.prompt = prompt
        self.result = result
        self.timer = timer

    async def deltas(self) -> AsyncIterator[Delta]:
        """Snapshots of each update until the request finishes (RequestError on failure)."""
        async for out in self.result:
            seq = out.outputs[0]
            self.timer.on_tokens(len(seq.token_ids_diff))
            yield Delta(self.index, seq.text_diff, len(seq.token_ids_diff), out.finished,
                        seq.finish_reason, seq.stop_reason)

    async def collect(self) -> GenerationResult:
        """Wait for the whole output."""
        async for _ in self.deltas():
            pass
        return self.result

    @property
    def num_generated(self) -> int:
        return len(self.result.outputs[0].token_ids)

    def close(self) -> None:
        """Abort the request if it is still running and record its metrics (idempotent)."""
        if not self.result.finished:
            self.result.abort()
            self.timer.finish("cancelled")
        else:
            self.timer.finish(self.result.outputs[0].finish_reason or "error")


async def merge_deltas(generations: list[Generation]) -> AsyncIterator[Delta]:
    """Interleave the deltas of several generations as they arrive."""
    if len(generations) == 1:
        async for delta in generations[0].deltas():
            yield delta
        return
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(gen: Generation) -> None:
        try:
            async for delta in gen.deltas():
                queue.put_nowait(delta)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(gen)) for gen in generations]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, or raise :class:`ClientDisconnected` (cancelling it) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected
    finally:
        watcher.cancel()
        task.cancel()


class GenerationStream(StreamingResponse):
    """A server-sent-event response that closes its generations however it ends.

    When the client disconnects, Starlette cancels the send loop and may leave the
    body generator suspended; closing the generations here aborts them at once
    rather than whenever the generator is garbage collected.
    """

    def __init__(self, content: AsyncIterator[str], generations: list[Generation]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._generations = generations
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for gen in self._generations:
                gen.close()
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()


class ServingContext:
    """Everything the handlers share: the engine, its tokenizer, limits and metrics."""

    def __init__(self, llm: LLM, served_model_name: str, stall_timeout_s: float) -> None:
        self.llm = llm
        self.model_name = served_model_name
        self.tokenizer = llm.tokenizer
        self.max_seq_len = llm.executor.engine.limits.max_seq_len
        self.stall_timeout_s = stall_timeout_s
        self.metrics = ServerMetrics(llm, served_model_name)

    def tokenize(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of ``text``; a 400 naming ``param`` if there is no tokenizer."""
        if self.tokenizer is None:
            raise invalid("this server has no tokenizer (skip_tokenizer_init); send token ids", param=param)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` (empty without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def submit(self, items: list[tuple[Prompt, SamplingParams]], param: str = "prompt") -> list[Generation]:
        """Submit every prompt, or none: a rejected one aborts those already submitted.

        The engine's own checks (token ids in the vocabulary, lengths) become a 400
        naming ``param`` (with the prompt's index when there are several).
        """
        def name(index: int) -> str:
            return param if len(items) == 1 else f"{param}[{index}]"

        try:
            engine = self.llm.executor.engine
        except RuntimeError as exc:
            raise OpenAIError(f"the engine is not running: {exc}", status=503,
                              type="service_unavailable_error") from None
        for index, (prompt, params) in enumerate(items):  # all checked before any is submitted
            try:
                engine.validate(prompt.token_ids, params.max_tokens)
            except ValueError as exc:
                raise invalid(str(exc), param=name(index)) from None
        generations: list[Generation] = []
        try:
            for index, (prompt, params) in enumerate(items):
                try:
                    result = self.llm.generate_async({"prompt_token_ids": prompt.token_ids}, params,
                                                     streaming=True)
                except ValueError as exc:
                    raise invalid(str(exc), param=name(index)) from None
                except RuntimeError as exc:
                    raise OpenAIError(f"the engine is not running: {exc}", status=503,
                                      type="service_unavailable_error") from None
                timer = self.metrics.start_request(len(prompt.token_ids))
                generations.append(Generation(index, prompt, result, timer))
        except BaseException:
            for gen in generations:
                gen.close()
            raise
        return generations

    async def run_to_completion(self, request: Request, generations: list[Generation]) -> list[GenerationResult]:
        """Wait for all generations; aborts them if the client disconnects first.

        Raises :class:`ClientDisconnected`, or an :class:`OpenAIError` (500) if a
        request failed inside the engine.
        """
        try:
            return await unless_disconnected(
                request, asyncio.gather(*(gen.collect() for gen in generations))
            )
        except RequestError as exc:
            logger.error("request failed in the engine: %s", exc)
            raise OpenAIError(str(exc), status=500, type="server_error") from None
        finally:
            for gen in generations:
                gen.close()


RequestModel = TypeVar("RequestModel", bound=BaseModel)


async def read_request(request: Request, model: type[RequestModel], ctx: ServingContext) -> RequestModel:
    """Parse and check an OpenAI request body: schema, model name, unsupported fields."""
    try:
        req = model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    check_model(req.model, ctx.model_name)
    check_unsupported(req)
    return req


def usage_of(generations: list[Generation]) -> UsageInfo:
    """Token counts of a response over all its generations."""
    prompt = sum(len(g.prompt.token_ids) for g in generations)
    completion = sum(g.num_generated for g in generations)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

