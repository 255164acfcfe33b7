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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rtllm.executor.result import GenerationResult, RequestError, TokenLogprobs
from rtllm.sampling_params import SamplingParams
from rtllm.serve.errors import OpenAIError, from_validation_error, invalid
from rtllm.serve.logprobs import TokenStrings
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


def truncated(prompt: Prompt, keep: int | None) -> Prompt:
    """``prompt`` cut to its last ``keep`` tokens (``truncate_prompt_tokens``; None keeps all).

    The server cuts the prompt itself, so that lengths, ``usage`` and ``echo`` see what
    the engine runs; a ``keep`` < 1 is left for ``SamplingParams`` to refuse.
    """
    if keep is None or keep < 1 or len(prompt.token_ids) <= keep:
        return prompt
    return Prompt(prompt.token_ids[-keep:], None)


@dataclass(slots=True)
class Delta:
    """What engine updates added to one output of one generation since its last delta.

    ``index`` is the generation's (prompt's) index, ``output`` the output's index within
    it (several with ``n > 1``); ``logprobs`` holds the new tokens' entries when asked for.
    """

    index: int
    output: int
    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: TokenLogprobs | None = None


@dataclass(slots=True)
class _Sent:
    """How much of one output earlier deltas have carried."""

    tokens: int = 0
    chars: int = 0
    finished: bool = False


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
        """A delta per changed output after each update until the request finishes.

        Deltas are cut from each output's accumulated text, tokens and logprobs, so they
        are exact however the engine interleaves the updates of several outputs.
        Raises :class:`RequestError` if the request fails.
        """
        sent: list[_Sent] = []
        async for out in self.result:
            for i, seq in enumerate(out.outputs):
                while len(sent) <= i:
                    sent.append(_Sent())
                state = sent[i]
                finished = seq.finish_reason is not None or out.finished
                num_tokens = len(seq.token_ids) - state.tokens
                if num_tokens == 0 and len(seq.text) == state.chars and finished == state.finished:
                    continue
                logprobs = None if seq.logprobs is None else seq.logprobs[state.tokens:]
                text = seq.text[state.chars:]
                state.tokens, state.chars, state.finished = len(seq.token_ids), len(seq.text), finished
                self.timer.on_tokens(num_tokens)
                yield Delta(self.index, i, text, num_tokens, finished, seq.finish_reason,
                            seq.stop_reason, logprobs)

    async def collect(self) -> GenerationResult:
        """Wait for the whole output."""
        async for _ in self.deltas():
            pass
        return self.result

    @property
    def num_generated(self) -> int:
        """Tokens generated over all outputs."""
        return sum(len(out.token_ids) for out in self.result.outputs)

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


ErrorParam = Callable[[str], str | None]
"""Maps an engine error message to the request parameter it is about (None: unknown)."""


def _abort_submitted(task: asyncio.Future[list[GenerationResult]]) -> None:
    """Abort the requests a cancelled caller submitted in the background."""
    if task.cancelled() or task.exception() is not None:
        return
    for result in task.result():
        result.abort()


class ServingContext:
    """Everything the handlers share: the engine, its tokenizer, limits and metrics."""

    def __init__(self, llm: LLM, served_model_name: str, stall_timeout_s: float) -> None:
        self.llm = llm
        self.model_name = served_model_name
        self.tokenizer = llm.tokenizer
        self.max_seq_len = llm.executor.limits.max_seq_len
        self.vocab_size = llm.executor.limits.vocab_size
        self.token_strings = TokenStrings(self.tokenizer)
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

    def _executor(self) -> Any:
        try:
            return self.llm.executor
        except RuntimeError as exc:
            raise OpenAIError(f"the engine is not running: {exc}", status=503,
                              type="service_unavailable_error") from None

    @staticmethod
    def _names(items: list[tuple[Prompt, SamplingParams]], param: str) -> list[str]:
        return [param] if len(items) == 1 else [f"{param}[{i}]" for i in range(len(items))]

    def _validate(self, items: list[tuple[Prompt, SamplingParams]], names: list[str]) -> None:
        executor = self._executor()
        for name, (prompt, params) in zip(names, items, strict=True):  # all before any is submitted
            try:
                executor.validate(prompt.token_ids, params.max_tokens)
            except ValueError as exc:
                raise invalid(str(exc), param=name) from None

    def _submit_results(
        self, items: list[tuple[Prompt, SamplingParams]], names: list[str], error_param: ErrorParam | None
    ) -> list[GenerationResult]:
        """Submit every prompt, or none: a rejected one aborts those already submitted."""
        results: list[GenerationResult] = []
        try:
            for name, (prompt, params) in zip(names, items, strict=True):
                try:
                    results.append(self.llm.generate_async({"prompt_token_ids": prompt.token_ids}, params,
                                                           streaming=True))
                except ValueError as exc:
                    message = str(exc)
                    known = error_param(message) if error_param is not None else None
                    if known is None:
                        raise invalid(message, param=name) from None
                    if not message.startswith(known):
                        message = f"invalid {known}: {message}"
                    raise invalid(message, param=known) from None
                except RuntimeError as exc:
                    raise OpenAIError(f"the engine is not running: {exc}", status=503,
                                      type="service_unavailable_error") from None
        except BaseException:
            for result in results:
                result.abort()
            raise
        return results

    def _track(self, items: list[tuple[Prompt, SamplingParams]], results: list[GenerationResult]) -> list[Generation]:
        return [
            Generation(index, prompt, result, self.metrics.start_request(len(prompt.token_ids)))
            for index, ((prompt, _), result) in enumerate(zip(items, results, strict=True))
        ]

    def submit(
        self, items: list[tuple[Prompt, SamplingParams]], param: str = "prompt", error_param: ErrorParam | None = None
    ) -> list[Generation]:
        """Submit every prompt, or none: a rejected one aborts those already submitted.

        The engine's own checks (token ids in the vocabulary, lengths) become a 400
        naming ``param`` (with the prompt's index when there are several); other
        ``ValueError`` messages of the submission (e.g. a guide that does not compile)
        name ``error_param(message)`` when it knows the parameter.
        """
        names = self._names(items, param)
        self._validate(items, names)
        return self._track(items, self._submit_results(items, names, error_param))

    async def submit_async(
        self, items: list[tuple[Prompt, SamplingParams]], param: str = "prompt", error_param: ErrorParam | None = None
    ) -> list[Generation]:
        """Like :meth:`submit`, compiling guided requests' grammars off the event loop.

        The engine compiles a request's grammar at submission (the first one also builds
        the tokenizer's grammar tables), which can take a while; other streams go on
        meanwhile. If the caller is cancelled, whatever was submitted is aborted.
        """
        if all(params.guided_decoding is None for _, params in items):
            return self.submit(items, param, error_param)
        names = self._names(items, param)
        self._validate(items, names)
        task = asyncio.ensure_future(asyncio.to_thread(self._submit_results, items, names, error_param))
        try:
            results = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_abort_submitted)
            raise
        return self._track(items, results)

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

