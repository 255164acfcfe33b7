"""``POST /v1/completions``: one or more prompts, plain or streamed (server-sent events)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rtllm.executor.result import RequestError
from rtllm.serve.errors import OpenAIError, invalid
from rtllm.serve.generation import (
    SSE_DONE,
    ClientDisconnected,
    Generation,
    GenerationStream,
    Prompt,
    ServingContext,
    merge_deltas,
    read_request,
    sse,
    usage_of,
)
from rtllm.serve.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from rtllm.serve.sampling import (
    resolve_max_tokens,
    to_sampling_params,
)

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


async def create_completion(request: Request, ctx: ServingContext) -> Response:
    """Handle ``POST /v1/completions``."""
    req = await read_request(request, CompletionRequest, ctx)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise invalid(f"max_tokens must be at least 1, got {req.max_tokens}", param="max_tokens")
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    prompts = parse_prompts(ctx, req.prompt, add_special)
    items = []
    for i, prompt in enumerate(prompts):
        prompt_param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        max_tokens = resolve_max_tokens(
            16 if req.max_tokens is None else req.max_tokens, "max_tokens",
            len(prompt.token_ids), ctx.max_seq_len, prompt_param,
        )
        items.append((prompt, to_sampling_params(req, max_tokens, add_special)))
    if req.user:
        logger.debug("completion request from user %r", req.user)
    generations = ctx.submit(items)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return GenerationStream(_stream(ctx, generations, bool(req.echo), include_usage), generations)
    try:
        await ctx.run_to_completion(request, generations)
    except ClientDisconnected:
        logger.info("client disconnected; aborted %d request(s)", len(generations))
        return Response(status_code=499)
    choices = []
    for gen in generations:
        out = gen.result.outputs[0]
        text = (_echo_text(ctx, gen.prompt) if req.echo else "") + out.text
        choices.append(CompletionChoice(index=gen.index, text=text, finish_reason=out.finish_reason,
                                        stop_reason=out.stop_reason))
    response = CompletionResponse(model=ctx.model_name, choices=choices, usage=usage_of(generations))
    return JSONResponse(response.model_dump())


async def _stream(
    ctx: ServingContext, generations: list[Generation], echo: bool, include_usage: bool
) -> AsyncIterator[str]:
    response_id, created = random_id("cmpl"), int(time.time())

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        body = CompletionStreamResponse(id=response_id, created=created, model=ctx.model_name,
                                        choices=choices, usage=usage)
        return sse(body.model_dump(exclude=None if include_usage else {"usage"}))

    try:
        if echo:
            for gen in generations:
                yield chunk([CompletionChoice(index=gen.index, text=_echo_text(ctx, gen.prompt))])
        async for delta in merge_deltas(generations):
            if delta.text:
                yield chunk([CompletionChoice(index=delta.index, text=delta.text)])
            if delta.finished:
                yield chunk([CompletionChoice(index=delta.index, text="", finish_reason=delta.finish_reason,
                                              stop_reason=delta.stop_reason)])
        if include_usage:
            yield chunk([], usage_of(generations))
    except RequestError as exc:
        logger.error("streamed completion failed in the engine: %s", exc)
        yield sse(OpenAIError(str(exc), status=500, type="server_error").body())
    finally:
        for gen in generations:
            gen.close()
    yield SSE_DONE
