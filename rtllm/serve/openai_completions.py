"""``POST /v1/completions``: one or more prompts, plain or streamed (server-sent events)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rtllm.executor.result import RequestError, TokenLogprobs
from rtllm.serve.errors import OpenAIError, invalid
from rtllm.serve.generation import (
    SSE_DONE,
    ClientDisconnected,
    Delta,
    Generation,
    GenerationStream,
    Prompt,
    ServingContext,
    merge_deltas,
    read_request,
    sse,
    truncated,
    usage_of,
)
from rtllm.serve.logprobs import completion_logprobs, concat, echo_logprobs, prompt_logprobs
from rtllm.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from rtllm.serve.sampling import param_of_engine_error, resolve_max_tokens, to_sampling_params

logger = logging.getLogger(__name__)

_PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_prompts(ctx: ServingContext, prompt: Any, add_special_tokens: bool) -> list[Prompt]:
    """Tokenize ``prompt`` (any of OpenAI's four forms) into one :class:`Prompt` per prompt."""
    if isinstance(prompt, str):
        raw: list[str | list[int]] = [prompt]
    elif _is_token_ids(prompt) and prompt:
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and (
        all(isinstance(p, str) for p in prompt) or all(_is_token_ids(p) for p in prompt)
    ):
        raw = list(prompt)
    else:
        if isinstance(prompt, list) and not prompt:
            raise invalid("prompt must not be empty", param="prompt")
        raise invalid(f"prompt must be {_PROMPT_TYPES}", param="prompt")
    prompts = []
    for i, item in enumerate(raw):
        param = "prompt" if len(raw) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid("prompt must not be an empty string", param=param)
            prompts.append(Prompt(ctx.tokenize(item, add_special_tokens, param), item))
        else:
            if not item:
                raise invalid("a token-id prompt must not be empty", param=param)
            prompts.append(Prompt(list(item), None))
    return prompts


def _echo_text(ctx: ServingContext, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else ctx.detokenize(prompt.token_ids)


def _logprobs_of(
    ctx: ServingContext, req: CompletionRequest, entries: TokenLogprobs | None, offset: int
) -> tuple[CompletionLogprobs | None, int]:
    """The logprobs object of ``entries`` (None unless asked for) and the next text offset."""
    if req.logprobs is None:
        return None, offset
    return completion_logprobs(entries or [], ctx.token_strings, offset)


def _echo_logprobs_of(
    ctx: ServingContext, req: CompletionRequest, gen: Generation
) -> tuple[CompletionLogprobs | None, int]:
    """With ``echo`` and ``logprobs``: the prompt tokens' logprobs and the offset after them."""
    if not req.echo or req.logprobs is None:
        return None, 0
    return echo_logprobs(gen.prompt.token_ids, gen.result.prompt_logprobs, ctx.token_strings)


def _prompt_logprobs_of(ctx: ServingContext, req: CompletionRequest, gen: Generation) -> Any:
    if req.prompt_logprobs is None:
        return None
    return prompt_logprobs(gen.result.prompt_logprobs, len(gen.prompt.token_ids), ctx.token_strings)


async def create_completion(request: Request, ctx: ServingContext) -> Response:
    """Handle ``POST /v1/completions``."""
    req = await read_request(request, CompletionRequest, ctx)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise invalid(f"max_tokens must be at least 1, got {req.max_tokens}", param="max_tokens")
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    prompts = [truncated(p, req.truncate_prompt_tokens) for p in parse_prompts(ctx, req.prompt, add_special)]
    items = []
    for i, prompt in enumerate(prompts):
        prompt_param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        max_tokens = resolve_max_tokens(
            16 if req.max_tokens is None else req.max_tokens, "max_tokens",
            len(prompt.token_ids), ctx.max_seq_len, prompt_param,
        )
        items.append((prompt, to_sampling_params(req, max_tokens, add_special, ctx.vocab_size)))
    if req.user:
        logger.debug("completion request from user %r", req.user)
    generations = await ctx.submit_async(items, error_param=partial(param_of_engine_error, req))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return GenerationStream(_stream(ctx, req, generations, include_usage), generations)
    try:
        await ctx.run_to_completion(request, generations)
    except ClientDisconnected:
        logger.info("client disconnected; aborted %d request(s)", len(generations))
        return Response(status_code=499)
    n = req.n or 1
    choices = []
    for gen in generations:
        echo = _echo_text(ctx, gen.prompt) if req.echo else ""
        prompt_lps = _prompt_logprobs_of(ctx, req, gen)
        echo_lps, offset = _echo_logprobs_of(ctx, req, gen)
        for j, out in enumerate(gen.result.outputs):
            logprobs, _ = _logprobs_of(ctx, req, out.logprobs, offset)
            if echo_lps is not None and logprobs is not None:
                logprobs = concat(echo_lps, logprobs)
            choices.append(CompletionChoice(index=gen.index * n + j, text=echo + out.text, logprobs=logprobs,
                                            finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                            prompt_logprobs=prompt_lps))
    response = CompletionResponse(model=ctx.model_name, choices=choices, usage=usage_of(generations))
    return JSONResponse(response.model_dump())


async def _stream(
    ctx: ServingContext, req: CompletionRequest, generations: list[Generation], include_usage: bool
) -> AsyncIterator[str]:
    """The SSE chunks: one per text delta and one with each choice's finish reason.

    Choice ``i`` of prompt ``p`` has index ``p * n + i``. With ``logprobs``, a chunk
    carries the logprobs of the tokens whose text it brings; tokens that brought none
    (e.g. part of a stop string) have theirs in the choice's finish chunk. With ``echo``
    the prompt comes first, in a chunk of its own; with ``echo`` and ``logprobs`` that
    chunk waits for the engine's first update, which brings the prompt's logprobs.
    """
    response_id, created = random_id("cmpl"), int(time.time())
    n = req.n or 1
    offsets: dict[int, int] = {}  # choice index -> text offset of its next token
    pending: dict[int, TokenLogprobs] = {}  # choice index -> logprobs not sent yet
    prompt_sent: set[int] = set()
    echo_later = bool(req.echo) and req.logprobs is not None

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        body = CompletionStreamResponse(id=response_id, created=created, model=ctx.model_name,
                                        choices=choices, usage=usage)
        return sse(body.model_dump(exclude=None if include_usage else {"usage"}))

    def choice(delta: Delta, text: str, **fields: Any) -> CompletionChoice:
        index = delta.index * n + delta.output
        entries = pending.pop(index, [])
        logprobs = None
        if text or entries:
            logprobs, offsets[index] = _logprobs_of(ctx, req, entries, offsets.get(index, 0))
        if index not in prompt_sent:
            prompt_sent.add(index)
            fields["prompt_logprobs"] = _prompt_logprobs_of(ctx, req, generations[delta.index])
        return CompletionChoice(index=index, text=text, logprobs=logprobs, **fields)

    def echo_chunk(gen: Generation, index: int) -> str:
        logprobs, offsets[index] = _echo_logprobs_of(ctx, req, gen)
        return chunk([CompletionChoice(index=index, text=_echo_text(ctx, gen.prompt), logprobs=logprobs)])

    try:
        if req.echo and not echo_later:
            for gen in generations:
                for j in range(n):
                    yield echo_chunk(gen, gen.index * n + j)
        async for delta in merge_deltas(generations):
            if echo_later and delta.index * n + delta.output not in offsets:
                yield echo_chunk(generations[delta.index], delta.index * n + delta.output)
            if delta.logprobs:
                pending.setdefault(delta.index * n + delta.output, []).extend(delta.logprobs)
            if delta.text:
                yield chunk([choice(delta, delta.text)])
            if delta.finished:
                yield chunk([choice(delta, "", finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)])
        if include_usage:
            yield chunk([], usage_of(generations))
    except RequestError as exc:
        logger.error("streamed completion failed in the engine: %s", exc)
        yield sse(OpenAIError(str(exc), status=500, type="server_error").body())
    finally:
        for gen in generations:
            gen.close()
    yield SSE_DONE
