"""Turns engine token updates into text deltas: detokenization and stop strings.

Runs on the engine thread between steps, so a stop string found here ends the
request before the next step is scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class OutputProcessor:
    """Per-request text state; one instance per executor."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[int, _TextState | None] = {}

    def add(self, request: GenerationRequest) -> None:
        params = request.sampling_params
        if self.tokenizer is None or not params.detokenize:
            self._states[request.request_id] = None
            return
        self._states[request.request_id] = _TextState(
            IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            ),
            StopStringMatcher(params.stop_strings, params.include_stop_str_in_output),
        )

    def process(self, update: RequestUpdate) -> tuple[Response, bool]:
        """Build the response for ``update``.

        Returns ``(response, stopped_by_string)``; when the second item is True the
        caller must finish the request in the engine.
        """
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
        response = Response(update.new_token_ids, text, finished, finish_reason, stop_reason, update.error)
        if update.logprobs is not None:
            response.logprobs = to_logprob_dicts(update.logprobs)
        response.cumulative_logprob = update.cumulative_logprob
        response.generation_logits = update.generation_logits
        if update.prompt_logprobs is not None:
            response.prompt_logprobs = update.prompt_logprobs
        response.context_logits = update.context_logits
        return response, stopped and not update.finished

    def remove(self, request_id: int) -> None:
        self._states.pop(request_id, None)


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
