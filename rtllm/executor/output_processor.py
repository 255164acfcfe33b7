"""Turns engine token updates into response deltas: detokenization, stop strings, and
the sequences of one request (``n`` / ``best_of``).

Runs on the engine thread between steps, so a stop string found here ends the
sequence before the next step is scheduled. Each sequence has its own text state;
a request finishes when all its sequences have. With ``best_of > n`` nothing is
streamed: when the last sequence finishes, the ``n`` with the highest cumulative
logprob are sent, whole, as outputs ``0..n-1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rtllm.engine.engine import RequestUpdate
from rtllm.engine.step_output import TokenLogprobs as EngineTokenLogprobs
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import Logprob, Response, TokenLogprobs
from rtllm.llmapi.detokenizer import IncrementalDetokenizer
from rtllm.llmapi.stop_strings import StopStringMatcher


@dataclass(slots=True)
class _TextState:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher


@dataclass(slots=True)
class _Group:
    """A client request's bookkeeping: its parameters and its sequences still running."""

    request: GenerationRequest
    num_sequences: int
    num_returned: int
    finished: int = 0
    # best_of > n: each finished sequence's whole output, by sequence index.
    buffered: dict[int, Response] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)  # sequences that produced a response
    prompt_outputs: tuple[Any, Any] = (None, None)  # best_of: (prompt_logprobs, context_logits)

    @property
    def buffers(self) -> bool:
        return self.num_sequences > self.num_returned


class OutputProcessor:
    """Per-sequence text state and per-request completion; one instance per executor."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[int, _TextState | None] = {}  # engine sequence id -> text state
        self._groups: dict[int, _Group] = {}  # client id -> group

    def add(self, request: GenerationRequest) -> None:
        params = request.sampling_params
        num_returned = params.n
        # A beam search reports only its n best hypotheses, once, at the end.
        num_sequences = num_returned if params.use_beam_search else params.best_of or num_returned
        self._groups[request.request_id] = _Group(request, num_sequences, num_returned)
        self._states[request.request_id] = self._new_state(request)

    def _new_state(self, request: GenerationRequest) -> _TextState | None:
        params = request.sampling_params
        if self.tokenizer is None or not params.detokenize:
            return None
        return _TextState(
            IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            ),
            StopStringMatcher(params.stop_strings, params.include_stop_str_in_output),
        )

    def process(self, update: RequestUpdate) -> tuple[list[Response], bool]:
        """The responses for ``update`` (none while a best_of request buffers).

        Returns ``(responses, stopped_by_string)``; when the second item is True the
        caller must finish the sequence in the engine.
        """
        group = self._groups.get(update.client_request_id)
        if update.request_id not in self._states and group is not None:
            self._states[update.request_id] = self._new_state(group.request)  # a forked sequence
        state = self._states.get(update.request_id)
        finish_reason = None if update.finish_reason is None else update.finish_reason.value
        stop_reason: int | str | None = None
        if update.finished and finish_reason == "stop" and update.new_token_ids:
            stop_reason = update.new_token_ids[-1]
        text = ""
        stopped = False
        if state is not None:
            delta = state.detokenizer.add_tokens(update.new_token_ids)
            if update.finished:
                delta += state.detokenizer.flush()
            text, stopped = state.stops.process(delta)
            if stopped:
                finish_reason, stop_reason = "stop", state.stops.matched
            elif update.finished:
                text += state.stops.flush()
        finished = update.finished or stopped
        if finished:
            self._states.pop(update.request_id, None)
        tokens = update.new_token_ids
        if group is not None and update.request_id not in group.started:
            group.started.add(update.request_id)
            if not group.request.sampling_params.exclude_input_from_output:
                tokens, text = group.request.prompt_token_ids + tokens, self._prompt_text(group.request) + text
        response = Response(tokens, text, finished, finish_reason, stop_reason, update.error, index=update.seq_index)
        if update.logprobs is not None:
            response.logprobs = to_logprob_dicts(update.logprobs)
        response.cumulative_logprob = update.cumulative_logprob
        response.generation_logits = update.generation_logits
        if update.prompt_logprobs is not None:  # the first prompt token has none
            response.prompt_logprobs = [None, *to_logprob_dicts(update.prompt_logprobs)]
        response.context_logits = update.context_logits
        return self._route(group, response, update.error is not None), stopped and not update.finished

    def _prompt_text(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        if self.tokenizer is None or not request.sampling_params.detokenize:
            return ""
        return self.tokenizer.decode(
            request.prompt_token_ids, skip_special_tokens=request.sampling_params.skip_special_tokens
        )

    def _route(self, group: _Group | None, response: Response, failed: bool) -> list[Response]:
        """Mark request completion, and hold back best_of outputs until the end."""
        if group is None:
            return [response]
        client_id = group.request.request_id
        if response.finished:
            group.finished += 1
        done = group.finished >= group.num_sequences or failed
        response.request_finished = done
        if done:
            self._groups.pop(client_id, None)
        if failed or not group.buffers:
            return [response]
        if response.prompt_logprobs is not None or response.context_logits is not None:
            group.prompt_outputs = (response.prompt_logprobs, response.context_logits)
        _accumulate(group.buffered, response)
        if not done:
            return []
        best = sorted(group.buffered.values(), key=lambda r: -(r.cumulative_logprob or 0.0))[: group.num_returned]
        for index, chosen in enumerate(best):
            chosen.index = index
            chosen.request_finished = index == len(best) - 1
            chosen.prompt_logprobs, chosen.context_logits = group.prompt_outputs if index == 0 else (None, None)
        return best

    def remove(self, client_id: int) -> None:
        """Drop a request's state (all its sequences)."""
        self._groups.pop(client_id, None)
        self._states.pop(client_id, None)


def _accumulate(buffered: dict[int, Response], delta: Response) -> None:
    """Fold a sequence's delta into its whole-output response."""
    whole = buffered.get(delta.index)
    if whole is None:
        buffered[delta.index] = delta
        delta.token_ids = list(delta.token_ids)
        return
    whole.token_ids.extend(delta.token_ids)
    whole.text += delta.text
    if delta.logprobs is not None:
        whole.logprobs = (whole.logprobs or []) + delta.logprobs
    for name in ("finished", "finish_reason", "stop_reason", "cumulative_logprob", "error"):
        setattr(whole, name, getattr(delta, name))


def to_logprob_dicts(entries: list[EngineTokenLogprobs]) -> TokenLogprobs:
    """The engine's per-token logprobs as the API's dicts: the chosen token first (with its
    rank), then the top alternatives ranked 1, 2, ..."""
    result: TokenLogprobs = []
    for entry in entries:
        position = {entry.token_id: Logprob(entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            position.setdefault(token_id, Logprob(logprob, rank))
        result.append(position)
    return result
