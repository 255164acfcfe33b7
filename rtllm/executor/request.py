"""What a caller submits to an executor."""

from __future__ import annotations

from dataclasses import dataclass

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


def to_sampling_config(params: SamplingParams, default_end_ids: tuple[int, ...]) -> SamplingConfig:
    """Resolve user-facing :class:`SamplingParams` into the engine's :class:`SamplingConfig`."""
    end_ids = (params.end_id,) if params.end_id is not None else default_end_ids
    return SamplingConfig(
        max_tokens=params.max_tokens,
        temperature=1.0 if params.temperature is None else float(params.temperature),
        top_k=params.top_k or 0,
        top_p=1.0 if params.top_p is None else float(params.top_p),
        greedy=params.is_greedy,
        seed=params.seed,
        end_ids=frozenset(end_ids),
        stop_token_ids=frozenset(params.stop_token_ids or ()),
        ignore_eos=params.ignore_eos,
    )
