"""User-facing sampling parameters, with TensorRT-LLM's field names (vLLM aliases accepted).

Decoding is greedy when ``temperature == 0`` or ``top_k == 1``, and also (as in
TensorRT-LLM) when none of ``temperature``, ``top_k`` and ``top_p`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rtllm.structured.params import GuidedDecodingParams

# vLLM name -> TensorRT-LLM name. The alias is folded into the TRT-LLM field by __post_init__.
_ALIASES: dict[str, str] = {"bad_words": "bad", "logits_processors": "logits_processor"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float (bools and NaN/inf excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    # Every message starts with the field name: the OpenAI server maps it to the `param`.
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_token_id_list(value: object) -> bool:
    return isinstance(value, list | tuple) and all(_is_int(t) and t >= 0 for t in value)


def _as_str_list(value: object) -> list[str] | None:
    """``value`` as a list of non-empty strings, or None if it is not a str or list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) and s for s in items):
        return None
    return list(items)


def _is_set(value: object, default: object) -> bool:
    """Whether a field holds something other than its default (empty lists count as unset)."""
    if default is None:
        return value is not None and not (isinstance(value, list | tuple) and len(value) == 0)
    return value != default


def _int_at_least(low: int) -> Callable[[object], bool]:
    return lambda value: _is_int(value) and value >= low


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


def _is_str_list(value: object) -> bool:
    return _as_str_list(value) is not None


def _is_callables(value: object) -> bool:
    return callable(value) or (isinstance(value, list | tuple) and all(map(callable, value)))


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


# (field, check of its value, what is allowed): the single-field rules, in field order.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("max_tokens", _int_at_least(1), "an integer >= 1"),
    ("temperature", _optional(lambda v: _is_real(v) and v >= 0), ">= 0"),
    ("top_k", _optional(_int_at_least(0)), "an integer >= 0 (0 disables it)"),
    ("top_p", _optional(lambda v: _is_real(v) and 0 < v <= 1), "in (0, 1]"),
    ("seed", _optional(_is_int), "an integer"),
    ("end_id", _optional(_int_at_least(0)), "a token id >= 0"),
    ("pad_id", _optional(_int_at_least(0)), "a token id >= 0"),
    ("stop", _optional(_is_str_list), "a non-empty string or a list of them"),
    ("stop_token_ids", _optional(_is_token_id_list), "a list of token ids >= 0"),
    ("n", _int_at_least(1), "an integer >= 1"),
    ("min_p", lambda v: _is_real(v) and 0 <= v <= 1, "in [0, 1]"),
    ("repetition_penalty", lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    ("presence_penalty", lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    ("frequency_penalty", lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    ("no_repeat_ngram_size", _int_at_least(0), "an integer >= 0"),
    ("bad", _optional(_is_str_list), "a non-empty string or a list of them"),
    ("bad_token_ids", _optional(_is_token_id_list), "a list of token ids >= 0"),
    ("min_tokens", _int_at_least(0), "an integer >= 0"),
    ("logits_processor", _optional(_is_callables), "a callable or a list of callables"),
    ("truncate_prompt_tokens", _optional(_int_at_least(1)), "an integer >= 1 or None"),
    ("exclude_input_from_output", _is_bool, "a bool"),
    ("return_context_logits", _is_bool, "a bool"),
    ("return_generation_logits", _is_bool, "a bool"),
    ("logprobs", _optional(_int_at_least(0)), "an integer >= 0 or None"),
    ("prompt_logprobs", _optional(_int_at_least(0)), "an integer >= 0 or None"),
    ("use_beam_search", _is_bool, "a bool"),
    ("length_penalty", _is_real, "a finite number"),
    (
        "early_stopping",
        lambda v: _is_bool(v) or (_is_int(v) and v >= 0),
        "a bool or an integer >= 0",
    ),
)


@dataclass(slots=True)
class SamplingParams:
    """How to sample the continuation of one prompt.

    Fields marked raise ``NotImplementedError`` when given a non-default
    value, until the engine supports them.

    Attributes:
        max_tokens: Maximum number of tokens to generate (>= 1).
        temperature: Softmax temperature (>= 0); 0 means greedy.
        top_k: Sample among the k most likely tokens (>= 0); 0 or None disables it.
        top_p: Nucleus sampling mass in (0, 1]; None disables it.
        seed: Seed of this request's own random generator: the same seed gives the
            same tokens whatever else is in the batch.
        end_id: End-of-sequence token id; defaults to the model's EOS token(s).
        pad_id: Padding token id (accepted for API compatibility).
        stop: String(s) that end generation when they appear in the output text.
        stop_token_ids: Token ids that end generation when generated.
        include_stop_str_in_output: Keep a matched stop string in the output text.
        ignore_eos: Keep generating past the EOS token (up to ``max_tokens``).
        detokenize: Produce output text (otherwise only token ids).
        skip_special_tokens: Leave special tokens out of the output text.
        spaces_between_special_tokens: Put spaces between special tokens in the text.
        add_special_tokens: Add the tokenizer's special tokens (e.g. BOS) to text prompts.
        n: Number of sequences to return per prompt (>= 1). They share the prompt's KV
            blocks; sequence i > 0 of a seeded request uses seed + i.
        min_p: Keep only tokens whose probability is at least ``min_p`` times that of the
            most likely token, in [0, 1]; 0 disables it.
        repetition_penalty: Divide the positive logits (multiply the negative ones) of every
            token that occurs in the prompt or the generated tokens by this factor, > 0;
            1.0 disables it. Counts prompt + generated tokens, like transformers'
            ``RepetitionPenaltyLogitsProcessor``.
        presence_penalty: Subtracted once from the logit of every token that occurs in the
            generated tokens (the prompt is not counted; OpenAI's definition), in [-2, 2];
            0 disables it.
        frequency_penalty: Subtracted from a token's logit once per occurrence of that token
            in the generated tokens (the prompt is not counted; OpenAI's definition), in
            [-2, 2]; 0 disables it.
        no_repeat_ngram_size: Forbid any n-gram of this size from occurring twice in prompt +
            generated tokens (>= 0); 0 disables it.
        bad: String(s) never to generate; the last token of a word is banned when the output
            ends with the tokens before it (vLLM alias: ``bad_words``).
        bad_token_ids: Token ids never to generate.
        min_tokens: Generate at least this many tokens before an end-of-sequence token or a
            ``stop_token_ids`` token may end the request (>= 0, <= ``max_tokens``).
        embedding_bias: 1-D floating-point tensor of vocabulary size, added to the logits
            at every step.
        logits_processor: Callable (or list of them) that rewrites one request's logits
            each step; the calling convention is fixed when the engine applies it (vLLM
            alias: ``logits_processors``).
        truncate_prompt_tokens: Keep only the last k prompt tokens (k >= 1); None keeps the
            whole prompt.
        exclude_input_from_output: Leave the prompt out of the returned tokens and text
            (True); False puts the prompt's tokens and text in front of each output.
        return_context_logits: Return the float32 logits of every prompt position as
            ``RequestOutput.context_logits`` ``[prompt_len, vocab]`` (the prompt is then
            never served from the prefix cache).
        return_generation_logits: Return the float32 raw logits of every generated
            position as ``CompletionOutput.generation_logits`` ``[len, vocab]``.
        logprobs: Return the log-probability of each generated token and of the k most
            likely tokens at that step (k >= 0; 0 returns the generated token's only);
            None returns none. They are taken from the distribution after penalties and
            temperature, before top-k/top-p/min-p truncation (:mod:`rtllm.engine.logprobs`)
           .
        prompt_logprobs: Like ``logprobs``, for the prompt tokens, from the raw logits of the
            position before each (``RequestOutput.prompt_logprobs``; None for the first).
        best_of: Number of sequences generated, of which the best ``n`` are returned
            (>= ``n``); None means ``n``.
        use_beam_search: Beam search with ``best_of`` (or ``n``) beams instead of sampling
            (at most the LLM's ``max_beam_width``); the ``n`` best hypotheses are returned
            at the end (:mod:`rtllm.engine.beam_search`).
        length_penalty: Beam search scores a finished beam as its cumulative log-probability
            divided by ``length ** length_penalty`` (finite); 1.0 is the default.
        early_stopping: When beam search stops, as TensorRT-LLM's integer (>= 0; a bool
            reads as 0 or 1): 1 (True, the default) stops as soon as beam-width hypotheses
            have finished; 0 (False) also stops once the best live beam, scored at its
            current length, cannot beat the worst finished one; larger values ("never")
            make that estimate at the longest possible length.
        guided_decoding: A :class:`rtllm.structured.GuidedDecodingParams` (JSON schema,
            regex, EBNF grammar or any JSON object) the output must match; the engine masks
            every step's logits with xgrammar's token bitmask for this request.
        bad_words: vLLM alias of ``bad``; give one or the other.
        logits_processors: vLLM alias of ``logits_processor``; give one or the other.
    """

    max_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    add_special_tokens: bool = True
    n: int = 1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    min_tokens: int = 0
    embedding_bias: torch.Tensor | None = None
    logits_processor: Callable[..., Any] | list[Callable[..., Any]] | None = None
    truncate_prompt_tokens: int | None = None
    exclude_input_from_output: bool = True
    return_context_logits: bool = False
    return_generation_logits: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | int = 1
    guided_decoding: GuidedDecodingParams | None = None
    bad_words: str | list[str] | None = field(default=None, repr=False)
    logits_processors: Callable[..., Any] | list[Callable[..., Any]] | None = field(
        default=None, repr=False
    )
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)
    _bad_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._fold_aliases()
        self._validate()
        self._stop_list = _as_str_list(self.stop) or []
        self._bad_list = _as_str_list(self.bad) or []

    def _fold_aliases(self) -> None:
        # The alias is cleared once folded, so dataclasses.replace() does not see both.
        for alias, name in _ALIASES.items():
            value = getattr(self, alias)
            if value is None:
                continue
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name} and its vLLM alias {alias} were both given ({name}="
                    f"{getattr(self, name)!r}, {alias}={value!r}); give only one"
                )
            setattr(self, name, value)
            setattr(self, alias, None)

    def _validate(self) -> None:
        for name, check, allowed in _RULES:
            value = getattr(self, name)
            _require(check(value), name, value, allowed)
        # Rules that relate two fields, checked once each field is valid on its own.
        _require(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"<= max_tokens ({self.max_tokens})",
        )
        if self.best_of is not None:
            _require(
                _is_int(self.best_of) and self.best_of >= self.n,
                "best_of",
                self.best_of,
                f"an integer >= n ({self.n}) or None",
            )
        self._validate_embedding_bias()
        if self.guided_decoding is not None:
            from rtllm.structured.params import GuidedDecodingParams

            _require(
                isinstance(self.guided_decoding, GuidedDecodingParams),
                "guided_decoding",
                self.guided_decoding,
                "a GuidedDecodingParams or None",
            )

    def _validate_embedding_bias(self) -> None:
        bias = self.embedding_bias
        if bias is None:
            return
        import torch  # here, not at module level: most params never carry a tensor

        allowed = "a 1-D floating-point torch.Tensor of finite values, or None"
        _require(
            isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.is_floating_point(),
            "embedding_bias",
            bias,
            allowed,
        )
        # Reading the values synchronises with the tensor's device: once, at submission.
        _require(bool(torch.isfinite(bias).all()), "embedding_bias", bias, allowed)

    @property
    def is_greedy(self) -> bool:
        """True when decoding picks the most likely token at every step."""
        if self.temperature == 0 or self.top_k == 1:
            return True
        return self.temperature is None and not self.top_k and self.top_p is None

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a list (empty when none)."""
        return self._stop_list

    @property
    def bad_strings(self) -> list[str]:
        """The ``bad`` strings as a list (empty when none)."""
        return self._bad_list

    @property
    def needs_token_history(self) -> bool:
        """True when processing a step's logits needs the request's earlier token ids.

        That is the case for ``repetition_penalty``, ``presence_penalty``,
        ``frequency_penalty``, ``no_repeat_ngram_size``, ``logits_processor`` and ``bad``
        strings: a string may tokenize to several tokens, whose last one is banned only
        after the others, and the tokenizer is not known here, so any ``bad`` string counts.
        ``bad_token_ids`` (single tokens) and ``min_tokens`` (a count) do not need it.
        """
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram_size > 0
            or bool(self._bad_list)
            or _is_set(self.logits_processor, None)
        )


_DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(SamplingParams)}
