"""What a caller submits to an executor, and its translation into engine terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtllm.engine.llm_request import SamplingConfig
from rtllm.sampling_params import SamplingParams


@dataclass(slots=True)
class GenerationRequest:
    """A tokenized prompt with its sampling parameters.

    ``prompt`` is the original text (None for token-id prompts); it is echoed in
    the result and never re-tokenized.
    """

    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    streaming: bool = False
    priority: float = 0.0  # higher is admitted first; FCFS within a priority
    cache_salt: str | None = None  # requests with different salts never share KV blocks
    request_id: int = -1  # assigned by the executor at submission


def bad_word_sequences(words: list[str], tokenizer: Any | None) -> list[tuple[int, ...]]:
    """Token sequences of the ``bad`` strings, each as it tokenizes alone and after a space
    (how a word usually appears mid-text)."""
    if not words:
        return []
    if tokenizer is None:
        raise ValueError("bad words need a tokenizer; give bad_token_ids with skip_tokenizer_init=True")
    sequences: list[tuple[int, ...]] = []
    for word in words:
        for variant in (word, " " + word.lstrip(" ")):
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def to_sampling_config(
    params: SamplingParams,
    default_end_ids: tuple[int, ...],
    tokenizer: Any | None = None,
    vocab_size: int | None = None,
    device: Any = None,
) -> SamplingConfig:
    """Resolve user-facing :class:`SamplingParams` into the engine's :class:`SamplingConfig`.

    ``tokenizer`` turns ``bad`` strings into token sequences; ``vocab_size`` and
    ``device`` check and place ``embedding_bias``.
    """
    from rtllm.engine.logits_processors import LogitsParams

    end_ids = frozenset((params.end_id,) if params.end_id is not None else default_end_ids)
    stop_token_ids = frozenset(params.stop_token_ids or ())
    bad = bad_word_sequences(params.bad_strings, tokenizer)
    bad_ids = set(params.bad_token_ids or ()) | {seq[0] for seq in bad if len(seq) == 1}
    bias = params.embedding_bias
    if bias is not None:
        if vocab_size is not None and bias.shape[0] != vocab_size:
            raise ValueError(
                f"embedding_bias must have the model's vocab_size ({vocab_size}) entries, got {bias.shape[0]}"
            )
        bias = bias.to(device=device, dtype=bias.dtype) if device is not None else bias
    logits_params = LogitsParams(
        repetition_penalty=float(params.repetition_penalty),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        min_tokens=params.min_tokens,
        end_ids=end_ids | stop_token_ids,
        bad_token_ids=frozenset(bad_ids),
        bad_sequences=tuple(seq for seq in bad if len(seq) > 1),
        embedding_bias=bias,
    )
    processors = params.logits_processor
    if processors is None:
        processors = ()
    elif callable(processors):
        processors = (processors,)
    num_returned = params.n
    return SamplingConfig(
        max_tokens=params.max_tokens,
        temperature=1.0 if params.temperature is None else float(params.temperature),
        top_k=params.top_k or 0,
        top_p=1.0 if params.top_p is None else float(params.top_p),
        min_p=float(params.min_p),
        greedy=params.is_greedy,
        seed=params.seed,
        end_ids=end_ids,
        stop_token_ids=stop_token_ids,
        ignore_eos=params.ignore_eos,
        logits_params=None if logits_params.is_noop else logits_params,
        logits_processors=tuple(processors),
        num_logprobs=params.logprobs,
        num_prompt_logprobs=params.prompt_logprobs,
        return_context_logits=params.return_context_logits,
        return_generation_logits=params.return_generation_logits,
        guided=getattr(params, "guided_decoding", None),
        num_sequences=params.best_of or num_returned,
        num_returned=num_returned,
        use_beam_search=params.use_beam_search,
        length_penalty=float(params.length_penalty),
        early_stopping=int(params.early_stopping),
    )
