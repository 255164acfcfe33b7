"""From an OpenAI request to the engine's :class:`SamplingParams`, and what is refused.

Every parameter either reaches the engine or is answered with a 400 naming it: a
parameter the engine does not support yet is accepted only with its null / default
value (``presence_penalty: 0``, ``logit_bias: {}``, ``n: 1``, ...).
"""

from __future__ import annotations

from typing import Any

from rtllm.sampling_params import SamplingParams
from rtllm.serve.errors import OpenAIError, invalid, unsupported
from rtllm.serve.protocol import ChatCompletionRequest, CompletionRequest

# Parameter -> the non-null values that mean "off" (accepted); anything else is a 400.
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "detokenize": (True,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "prompt_logprobs": (),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "min_p": (0,),
    "min_tokens": (0,),
    "length_penalty": (1,),
    "use_beam_search": (False,),
    "best_of": (1,),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "truncate_prompt_tokens": (),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": ({},),
    "web_search_options": (),
}

_DESCRIPTIONS = {
    "detokenize": "detokenize=false (this API returns text, not token ids)",
    "logprobs": "returning log probabilities ('logprobs')",
    "top_logprobs": "returning log probabilities ('top_logprobs')",
    "best_of": "best_of > 1 (several candidates per prompt)",
    "tools": "tool calling ('tools')",
    "response_format": "structured output ('response_format' other than {\"type\": \"text\"})",
}

_MESSAGE_UNSUPPORTED = ("tool_calls", "tool_call_id", "function_call", "refusal", "audio")


def _is_off(value: Any, allowed: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    return any(
        value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in allowed
    )


def check_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Raise a 400 for the first parameter set to something the engine cannot do."""
    for name, allowed in _UNSUPPORTED_UNLESS.items():
        if name in type(request).model_fields and not _is_off(getattr(request, name), allowed):
            raise unsupported(name, _DESCRIPTIONS.get(name))
    if request.n is not None:
        if request.n < 1:
            raise invalid(f"n must be >= 1, got {request.n}", param="n")
        if request.n > 1:
            raise unsupported("n", f"n > 1 (several choices per prompt, got n={request.n})")
    if request.stream_options is not None and not request.stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    if isinstance(request, ChatCompletionRequest):
        for i, message in enumerate(request.messages):
            for name in _MESSAGE_UNSUPPORTED:
                if getattr(message, name) not in (None, []):
                    raise unsupported(f"messages[{i}].{name}")


def check_model(requested: str | None, served_model_name: str) -> None:
    """Raise a 400 unless ``requested`` is None or the served model's name."""
    if requested is not None and requested != served_model_name:
        raise invalid(
            f"The model '{requested}' does not exist; this server serves '{served_model_name}'",
            param="model",
            code="model_not_found",
        )


def resolve_max_tokens(
    requested: int | None, param: str, prompt_len: int, max_seq_len: int, prompt_param: str
) -> int:
    """The number of tokens to generate, checked against ``max_seq_len``.

    ``requested`` None means "up to the end of the context window".
    """
    if requested is not None and requested < 1:
        raise invalid(f"{param} must be at least 1, got {requested}", param=param)
    if prompt_len >= max_seq_len:
        raise invalid(
            f"This model's maximum context length is {max_seq_len} tokens; the prompt has "
            f"{prompt_len} tokens, which leaves no room for any output",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return max_seq_len - prompt_len
    if prompt_len + requested > max_seq_len:
        raise invalid(
            f"This model's maximum context length is {max_seq_len} tokens; the prompt has "
            f"{prompt_len} tokens and {param}={requested}, {prompt_len + requested} in all. "
            f"Lower {param} to at most {max_seq_len - prompt_len}",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def to_sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int, add_special_tokens: bool
) -> SamplingParams:
    """Build the engine's parameters; invalid values become a 400 naming the field."""
    if request.seed is not None and not -(2**63) <= request.seed < 2**64:
        raise invalid(f"seed must fit in 64 bits, got {request.seed}", param="seed")
    stop = request.stop if request.stop != [] else None
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "seed": request.seed,
        "stop": stop,
        "stop_token_ids": request.stop_token_ids,
        "end_id": request.end_id,
        "pad_id": request.pad_id,
        "add_special_tokens": add_special_tokens,
    }
    for flag in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                 "spaces_between_special_tokens"):
        value = getattr(request, flag)
        if value is not None:
            kwargs[flag] = value
    try:
        return SamplingParams(**kwargs)
    except (ValueError, NotImplementedError) as exc:
        message = str(exc)
        first = message.split(" ", 1)[0]
        param = first if first in type(request).model_fields else None
        raise OpenAIError(message, status=400, param=param) from None
