"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

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
from rtllm.serve.logprobs import chat_logprobs
from rtllm.serve.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from rtllm.serve.sampling import param_of_engine_error, resolve_max_tokens, to_sampling_params

logger = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _message_text(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise OpenAIError(f"content parts of type {kind!r} are not supported by this server yet; "
                              "only {\"type\": \"text\"} parts are", param=f"messages[{i}].content[{j}]",
                              code="unsupported_parameter")
        text = part.get("text")
        if not isinstance(text, str) or set(part) - {"type", "text"}:
            raise invalid("a text content part is {\"type\": \"text\", \"text\": <string>}",
                          param=f"messages[{i}].content[{j}]")
        texts.append(text)
    return "\n".join(texts)


def render_chat(ctx: ServingContext, req: ChatCompletionRequest) -> str:
    """The prompt text of ``req.messages`` with the tokenizer's chat template."""
    if not req.messages:
        raise invalid("messages must contain at least one message", param="messages")
    tokenizer = ctx.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise invalid("this model has no chat template; use /v1/completions", param="messages")
    conversation = []
    for i, message in enumerate(req.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise invalid(f"role must be one of {sorted(_ROLES)}, got {message.role!r}",
                          param=f"messages[{i}].role")
        entry: dict[str, Any] = {"role": role, "content": _message_text(message, i)}
        if message.name is not None:
            entry["name"] = message.name
        conversation.append(entry)
    add_generation_prompt = req.add_generation_prompt is not False
    continue_final = bool(req.continue_final_message)
    if continue_final:
        if add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
            raise invalid("continue_final_message and add_generation_prompt cannot both be true",
                          param="continue_final_message")
        if conversation[-1]["role"] != "assistant":
            raise invalid("continue_final_message needs a final assistant message",
                          param="continue_final_message")
        add_generation_prompt = False
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in ("conversation", "tokenize", "add_generation_prompt", "continue_final_message"):
        if reserved in kwargs:
            raise invalid(f"chat_template_kwargs must not set {reserved!r}", param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise invalid(f"the chat template could not render these messages: {exc}", param="messages") from None
    if not isinstance(text, str):
        raise OpenAIError("the chat template did not render to text", status=500, type="server_error")
    return text


def _logprobs_of(ctx: ServingContext, req: ChatCompletionRequest, entries: TokenLogprobs | None) -> ChatLogprobs | None:
    """The chat logprobs object of ``entries`` (None unless ``logprobs`` is true)."""
    if not req.logprobs:
        return None
    return chat_logprobs(entries or [], ctx.token_strings, req.top_logprobs or 0)


async def create_chat_completion(request: Request, ctx: ServingContext) -> Response:
    """Handle ``POST /v1/chat/completions``."""
    req = await read_request(request, ChatCompletionRequest, ctx)
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    if requested is not None and requested < 1:
        raise invalid(f"{param} must be at least 1, got {requested}", param=param)
    text = render_chat(ctx, req)
    add_special = bool(req.add_special_tokens)
    prompt = truncated(Prompt(ctx.tokenize(text, add_special, "messages"), text), req.truncate_prompt_tokens)
    max_tokens = resolve_max_tokens(requested, param, len(prompt.token_ids), ctx.max_seq_len, "messages")
    params = to_sampling_params(req, max_tokens, add_special, ctx.vocab_size)
    if req.user:
        logger.debug("chat request from user %r", req.user)
    generations = await ctx.submit_async([(prompt, params)], param="messages",
                                         error_param=partial(param_of_engine_error, req))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return GenerationStream(_stream(ctx, req, generations[0], include_usage), generations)
    try:
        await ctx.run_to_completion(request, generations)
    except ClientDisconnected:
        logger.info("client disconnected; aborted its chat request")
        return Response(status_code=499)
    gen = generations[0]
    choices = [
        ChatChoice(index=j, message=ChatResponseMessage(content=out.text), logprobs=_logprobs_of(ctx, req, out.logprobs),
                   finish_reason=out.finish_reason, stop_reason=out.stop_reason)
        for j, out in enumerate(gen.result.outputs)
    ]
    response = ChatCompletionResponse(model=ctx.model_name, choices=choices, usage=usage_of([gen]))
    return JSONResponse(response.model_dump())


async def _stream(
    ctx: ServingContext, req: ChatCompletionRequest, gen: Generation, include_usage: bool
) -> AsyncIterator[str]:
    """The SSE chunks: the role, then one per text delta and one with the finish reason.

    With ``logprobs``, a chunk carries the logprobs of the tokens whose text it brings;
    tokens that brought none (e.g. part of a stop string) have theirs in the finish chunk.
    """
    response_id, created = random_id("chatcmpl"), int(time.time())
    pending: dict[int, TokenLogprobs] = {}  # choice index -> logprobs not sent yet

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        body = ChatCompletionChunk(id=response_id, created=created, model=ctx.model_name,
                                   choices=choices, usage=usage)
        return sse(body.model_dump(exclude=None if include_usage else {"usage"}))

    def choice(index: int, delta: DeltaMessage, **fields: Any) -> ChatStreamChoice:
        entries = pending.pop(index, [])
        logprobs = _logprobs_of(ctx, req, entries) if delta.content or entries else None
        return ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, **fields)

    try:
        for j in range(req.n or 1):
            yield chunk([ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
        async for delta in merge_deltas([gen]):
            if delta.logprobs:
                pending.setdefault(delta.output, []).extend(delta.logprobs)
            if delta.text:
                yield chunk([choice(delta.output, DeltaMessage(content=delta.text))])
            if delta.finished:
                yield chunk([choice(delta.output, DeltaMessage(), finish_reason=delta.finish_reason,
                                    stop_reason=delta.stop_reason)])
        if include_usage:
            yield chunk([], usage_of([gen]))
    except RequestError as exc:
        logger.error("streamed chat completion failed in the engine: %s", exc)
        yield sse(OpenAIError(str(exc), status=500, type="server_error").body())
    finally:
        gen.close()
    yield SSE_DONE
