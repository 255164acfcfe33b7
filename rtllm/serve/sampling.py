"""From an OpenAI request to the engine's :class:`SamplingParams`, and what is refused.

Every parameter either reaches the engine or is answered with a 400 naming it:

- :data:`_UNSUPPORTED_UNLESS`: what this server does not do (tools, audio, ``suffix``...),
  accepted only with its null / default value.
- :data:`_ENGINE_PENDING`: what :func:`to_sampling_params` maps and the response builders
  handle (one choice per output, ``prompt_logprobs``, truncated prompts), refused while
  the engine does not apply it yet, i.e. while ``SamplingParams`` raises
  ``NotImplementedError`` for it (:func:`engine_refuses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtllm.sampling_params import SamplingParams
from rtllm.serve.errors import OpenAIError, invalid, unsupported
from rtllm.serve.protocol import ChatCompletionRequest, CompletionRequest
from rtllm.serve.structured import guide_param, guided_decoding

Request = CompletionRequest | ChatCompletionRequest

MAX_LOGPROBS = 20
"""Most top logprobs per token (completions ``logprobs``, chat ``top_logprobs``; vLLM's default)."""

LOGIT_BIAS_RANGE = 100.0
"""``logit_bias`` values must lie in [-100, 100] (OpenAI's range)."""

# Parameter -> the non-null values that mean "off" (accepted); anything else is a 400.
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "detokenize": (True,),
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
    "tools": "tool calling ('tools')",
}

# Parameter -> (is it on in this request?, what it does, a value that turns it on). Each is
# mapped by to_sampling_params to the SamplingParams field of the same name and handled by the
# response builders; it is refused only while SamplingParams raises NotImplementedError for it
# (engine_refuses). To refuse one for another reason, edit its line here.
_ENGINE_PENDING: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "n": (lambda r: (r.n or 1) > 1, "several choices per prompt", 2),
    "best_of": (lambda r: r.best_of not in (None, r.n or 1), "more candidates than choices", 2),
    "use_beam_search": (lambda r: bool(r.use_beam_search), "beam search", True),
    "length_penalty": (lambda r: r.length_penalty not in (None, 1), "beam search's length penalty", 0.5),
    "early_stopping": (lambda r: r.early_stopping is False, "beam search's other stopping rule", False),
    "prompt_logprobs": (lambda r: getattr(r, "prompt_logprobs", None) is not None,
                        "the prompt's log probabilities", 0),
    "truncate_prompt_tokens": (lambda r: r.truncate_prompt_tokens is not None, "prompt truncation", 1),
}


def engine_refuses(name: str) -> bool:
    """Whether ``SamplingParams`` raises ``NotImplementedError`` for pending parameter ``name``.

    Asked of ``SamplingParams`` itself (with the parameter turned on) on every request, so
    a parameter the engine starts applying is accepted without a server change, and one it
    does not is refused up front with a message naming it.
    """
    try:
        SamplingParams(**{name: _ENGINE_PENDING[name][2]})
    except NotImplementedError:
        return True
    except ValueError:  # on its own the probe may be invalid; the request's values decide
        return False
    return False


_MESSAGE_UNSUPPORTED = ("tool_calls", "tool_call_id", "function_call", "refusal", "audio")


def _is_off(value: Any, allowed: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    return any(
        value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in allowed
    )


def _check_counts(request: Request) -> None:
    """``n`` >= 1 and ``best_of`` >= ``n`` (before they are refused as not supported yet)."""
    if request.n is not None and request.n < 1:
        raise invalid(f"n must be >= 1, got {request.n}", param="n")
    if request.best_of is not None and request.best_of < (request.n or 1):
        raise invalid(f"best_of must be >= n ({request.n or 1}), got {request.best_of}", param="best_of")


def check_unsupported(request: Request) -> None:
    """Raise a 400 for the first parameter set to something the server or engine cannot do."""
    for name, allowed in _UNSUPPORTED_UNLESS.items():
        if name in type(request).model_fields and not _is_off(getattr(request, name), allowed):
            raise unsupported(name, _DESCRIPTIONS.get(name))
    _check_counts(request)
    for name, (is_on, what, _) in _ENGINE_PENDING.items():
        if is_on(request) and engine_refuses(name):
            raise unsupported(name, f"{what} ({name}={getattr(request, name)!r})")
    wants_logprobs = request.logprobs is not None and request.logprobs is not False
    if request.use_beam_search and wants_logprobs:
        # The engine returns a beam's cumulative logprob only, not one per token.
        raise unsupported("logprobs", "logprobs with use_beam_search (per-token logprobs of beams)")
    if (isinstance(request, CompletionRequest) and request.echo and request.logprobs is not None
            and engine_refuses("prompt_logprobs")):
        # The logprobs then cover the prompt's tokens too: the engine's prompt logprobs.
        raise unsupported("echo", "echo together with logprobs (the prompt's logprobs)")
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


def _logprobs(request: Request) -> int | None:
    """``SamplingParams.logprobs``: the number of top logprobs per token, None for none."""
    if isinstance(request, CompletionRequest):
        count, param = request.logprobs, "logprobs"
    else:
        count, param = request.top_logprobs, "top_logprobs"
        if count and not request.logprobs:
            raise invalid("top_logprobs needs logprobs=true", param=param)
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise invalid(f"{param} must be in [0, {MAX_LOGPROBS}], got {count}", param=param)
    if isinstance(request, CompletionRequest):
        return count
    return (count or 0) if request.logprobs else None


def _prompt_logprobs(request: Request) -> int | None:
    """``SamplingParams.prompt_logprobs``: asked for, or needed by ``echo`` with ``logprobs``."""
    asked = getattr(request, "prompt_logprobs", None)
    if isinstance(request, CompletionRequest) and request.echo and request.logprobs is not None:
        return max(request.logprobs, asked or 0)
    return asked


def logit_bias_tensor(logit_bias: dict[str, float] | None, vocab_size: int) -> Any:
    """OpenAI's ``logit_bias`` (token id string -> bias) as a ``[vocab_size]`` float32 tensor.

    Returns None for no (or an empty) ``logit_bias``; a 400 naming ``logit_bias`` for a
    key that is not a token id below ``vocab_size`` or a value outside [-100, 100].
    """
    if not logit_bias:
        return None
    import torch

    bias = torch.zeros(vocab_size, dtype=torch.float32)
    for key, value in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if not 0 <= token_id < vocab_size or key.strip() != key:
            raise invalid(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                          param="logit_bias")
        if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise invalid(f"logit_bias values must be in [-100, 100], got {value!r} for token {key}",
                          param="logit_bias")
        bias[token_id] = value
    return bias


def _bad_words(request: Request) -> str | list[str] | None:
    if request.bad_words is not None and request.bad is not None:
        raise invalid("bad_words and bad are the same option (vLLM's and TensorRT-LLM's name); "
                      "give one", param="bad")
    return request.bad_words if request.bad_words is not None else request.bad


def param_of_engine_error(request: Request, message: str) -> str | None:
    """The request parameter an engine error message is about (None if unknown).

    ``SamplingParams`` and the engine start their messages with the field at fault
    (``min_p must be ...``, ``GuidedDecodingParams.regex is not a valid regex ...``).
    """
    first = message.split(" ", 1)[0].rstrip(":,")
    field = first.split(".", 1)[0]
    if field in ("prompt", "messages"):  # the caller names the prompt (with its index)
        return None
    if field in ("GuidedDecodingParams", "guided_decoding"):
        return guide_param(request)
    if message.startswith("beam width"):  # the LLM's max_beam_width is too small
        return "best_of" if request.best_of is not None else "n"
    renamed = {
        "embedding_bias": "logit_bias",
        "bad": "bad_words" if request.bad_words is not None else "bad",
        "bad_words": "bad_words",
        "logprobs": "logprobs" if isinstance(request, CompletionRequest) else "top_logprobs",
    }
    if field in renamed:
        return renamed[field]
    return field if field in type(request).model_fields else None


def to_sampling_params(
    request: Request, max_tokens: int, add_special_tokens: bool, vocab_size: int
) -> SamplingParams:
    """Build the engine's parameters; invalid values become a 400 naming the field.

    ``vocab_size`` is the width of the model's logits (the size of the ``logit_bias``
    tensor).
    """
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
        "bad": _bad_words(request),
        "embedding_bias": logit_bias_tensor(request.logit_bias, vocab_size),
        "logprobs": _logprobs(request),
        "guided_decoding": guided_decoding(request),
        # Engine-pending (_ENGINE_PENDING): refused before this point while the engine is.
        "n": 1 if request.n is None else request.n,
        "best_of": request.best_of,
        "use_beam_search": bool(request.use_beam_search),
        "prompt_logprobs": _prompt_logprobs(request),
        "truncate_prompt_tokens": request.truncate_prompt_tokens,
    }
    for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                 "spaces_between_special_tokens", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_p", "min_tokens", "no_repeat_ngram_size",
                 "length_penalty", "early_stopping"):
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except (ValueError, NotImplementedError) as exc:
        message = str(exc)
        raise OpenAIError(message, status=400, param=param_of_engine_error(request, message)) from None
