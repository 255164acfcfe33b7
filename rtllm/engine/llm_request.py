"""The engine's view of one request: tokens, progress and lifecycle state."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PENDING_TOKEN = -1
"""Placeholder in ``output_token_ids`` for a token still on the device."""


class RequestState(enum.Enum):
    """Lifecycle: WAITING -> RUNNING -> FINISHED (from any state on abort or error).

    A request paused under MAX_UTILIZATION goes back from RUNNING to WAITING.
    """

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    """Why a request stopped generating (OpenAI's values, plus cancelled/error)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(slots=True)
class SamplingConfig:
    """The per-request sampling knobs the engine uses, resolved from SamplingParams."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    greedy: bool = True
    seed: int | None = None
    end_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    # A rtllm.engine.logits_processors.LogitsParams when any penalty, ban or bias is active.
    logits_params: Any = None
    # User callables ``fn(token_ids, logits) -> logits`` (or ``fn(prompt_ids, token_ids, logits)``).
    logits_processors: tuple[Callable[..., Any], ...] = ()
    num_logprobs: int | None = None
    num_prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    guided: Any = None  # a rtllm.structured.GuidedDecodingParams
    num_sequences: int = 1  # sequences generated for the prompt (best_of, or n)
    num_returned: int = 1  # sequences returned (n)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: int = 1

    @property
    def needs_history(self) -> bool:
        """Processing this request's logits needs its latest token on the host (the
        engine then commits the previous step before scheduling the next)."""
        # Penalties read the last token on the device (PendingTokens); multi-token bad
        # words are matched on the host.
        params = self.logits_params
        history_params = params is not None and bool(params.bad_sequences)
        return (
            history_params or bool(self.logits_processors) or self.guided is not None or self.use_beam_search
        )

    @property
    def needs_logprobs(self) -> bool:
        """Sampled-token log-probabilities are computed (asked for, or to rank sequences)."""
        return self.num_logprobs is not None or self.num_sequences > 1

    @property
    def needs_prompt_logits(self) -> bool:
        """Logits of every prompt position are needed (so no prefix may be reused)."""
        return self.num_prompt_logprobs is not None or self.return_context_logits


@dataclass(slots=True, eq=False)
class LlmRequest:
    """One request inside the engine.

    Invariant: tokens ``[0, num_computed_tokens)`` of ``all_token_ids`` have KV in
    the cache; each step the scheduler moves ``num_computed_tokens`` towards
    ``num_tokens``. Context (prefill), chunked context and generation are the same
    catch-up: a request generates once its whole prompt is computed.
    """

    request_id: int
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    max_seq_len: int
    output_token_ids: list[int] = field(default_factory=list)
    # Trailing entries of output_token_ids that are placeholders for tokens sampled
    # on the device but not yet read back (the overlap loop reads them a step later).
    num_pending_tokens: int = 0
    num_computed_tokens: int = 0
    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: Any = None  # torch.Generator of a seeded request, made by the sampler
    priority: float = 0.0  # higher runs first; FCFS within a priority
    cache_salt: str | None = None  # requests with different salts never share KV blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0  # times paused (MAX_UTILIZATION) and later recomputed
    first_token_time: float | None = None  # monotonic time the first output token was committed
    grammar: Any = None  # a rtllm.structured.RequestGrammar while guided decoding
    cumulative_logprob: float = 0.0  # sum of the committed tokens' logprobs (when computed)
    # Sequences of one prompt (n / best_of / beams) share a SequenceGroup; sequence 0
    # (whose id is the client's request id) computes the prompt, the others fork from it.
    group: Any = None
    seq_index: int = 0
    # Float32 logits of the prompt positions computed so far (prompt_logprobs /
    # return_context_logits), one device tensor per chunk, until the first token commits.
    prompt_logit_chunks: list[Any] = field(default_factory=list)

    @property
    def client_id(self) -> int:
        """The id the client knows: the group's for a forked sequence, else its own."""
        return self.group.client_id if self.group is not None else self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens this request can hold at most when it finishes."""
        return min(self.num_prompt_tokens + self.sampling.max_tokens, self.max_seq_len)

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def tokens_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_committed_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_pending_tokens

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        if self.num_pending_tokens:
            del self.output_token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0
        self.state = RequestState.FINISHED
        self.finish_reason = reason
        self.error = error
