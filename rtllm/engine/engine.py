"""The engine loop body: :meth:`Engine.step` schedules, runs, samples and updates.

Every step is *launched* (inputs built, forward pass and sampling queued on the
device, sampled tokens appended to their requests as placeholders) and later
*committed* (tokens read back, placeholders replaced, stop checks, blocks freed).
Without overlap a step is committed right after its launch. With overlap, step N
is launched before step N-1 is committed, so the host prepares N while the device
still runs N-1; step N reads N-1's tokens straight from the device tensor. A
request that finishes at commit N-1 has already been launched in step N: that
extra token is dropped at commit N (the price of never waiting on the device).

Errors never kill the loop: if a launch fails, the step's requests are retried
alone so only the request that really fails gets an error; finished, aborted and
failed requests always give their KV blocks back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rtllm.engine import beam_groups
from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.llm_request import PENDING_TOKEN, FinishReason, LlmRequest
from rtllm.engine.logits_processors import PendingTokens
from rtllm.engine.logprobs import prompt_token_logprobs
from rtllm.engine.sampler import Sampler
from rtllm.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from rtllm.engine.sequence_group import SequenceGroup, fork
from rtllm.engine.step_output import LaunchedStep, RequestUpdate, TokenLogprobs
from rtllm.runtime.model_runner import ModelRunner, TokenSources
from rtllm.runtime.transfer import to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Request limits checked at submission."""

    max_seq_len: int
    max_num_tokens: int
    vocab_size: int
    enable_chunked_prefill: bool
    max_beam_width: int = 1


def validate_request(
    limits: EngineLimits, pool_tokens: int, prompt_token_ids: list[int], max_tokens: int, beam_width: int = 1
) -> None:
    """Raise ``ValueError`` if a request with this prompt can never run on an engine with
    these limits and a KV pool of ``pool_tokens`` tokens."""
    if beam_width > limits.max_beam_width:
        raise ValueError(
            f"beam width {beam_width} (best_of or n with use_beam_search) exceeds the LLM's "
            f"max_beam_width={limits.max_beam_width}; create the LLM with max_beam_width >= {beam_width}"
        )
    num = len(prompt_token_ids)
    if num == 0:
        raise ValueError("prompt is empty: at least one token is needed")
    bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {limits.vocab_size}); got {bad[:5]}")
    if num > limits.max_seq_len:
        raise ValueError(f"prompt has {num} tokens, more than max_seq_len={limits.max_seq_len}")
    if num + max_tokens > limits.max_seq_len:
        raise ValueError(
            f"prompt ({num} tokens) + max_tokens ({max_tokens}) exceeds max_seq_len="
            f"{limits.max_seq_len}; lower max_tokens to at most {limits.max_seq_len - num}"
        )
    if num + max_tokens > pool_tokens:
        raise ValueError(
            f"prompt ({num} tokens) + max_tokens ({max_tokens}) exceeds the KV cache "
            f"({pool_tokens} tokens); lower max_tokens or raise kv_cache_config.max_tokens"
        )
    if num > limits.max_num_tokens and not limits.enable_chunked_prefill:
        raise ValueError(
            f"prompt has {num} tokens, more than max_num_tokens={limits.max_num_tokens}; "
            "raise max_num_tokens or set enable_chunked_prefill=True"
        )


class Engine:
    """Inflight batching over a :class:`Scheduler`, a :class:`ModelRunner` and a :class:`Sampler`."""

    def __init__(
        self,
        runner: ModelRunner,
        kv_cache: KVCacheManager,
        scheduler: Scheduler,
        sampler: Sampler,
        limits: EngineLimits,
        overlap: bool = False,
    ) -> None:
        self.runner = runner
        self.kv_cache = kv_cache
        self.scheduler = scheduler
        self.sampler = sampler
        self.limits = limits
        self.overlap = overlap
        self.requests: dict[int, LlmRequest] = {}
        self.num_steps = 0
        self._in_flight: LaunchedStep | None = None
        # What the last step scheduled, and (when track_finished is set, for the
        # per-request stats) the requests finished since take_finished() was called.
        self.last_output: SchedulerOutput | None = None
        self.track_finished = False
        self._finished: list[LlmRequest] = []
        self.groups: dict[int, SequenceGroup] = {}  # client id -> its sequences (n > 1)
        self._next_sequence_id = 1 << 40  # ids of forked sequences, apart from client ids

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def validate(self, prompt_token_ids: list[int], max_tokens: int, beam_width: int = 1) -> None:
        """Raise ``ValueError`` if a request with this prompt can never run."""
        pool_tokens = self.kv_cache.num_blocks * self.kv_cache.tokens_per_block
        validate_request(self.limits, pool_tokens, prompt_token_ids, max_tokens, beam_width)

    def add_request(self, request: LlmRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id} is already in the engine")
        if request.sampling.num_sequences > 1 or request.sampling.use_beam_search:
            request.group = SequenceGroup(request.request_id, request.sampling.num_sequences, [request])
            if request.sampling.use_beam_search:
                request.group.beam = beam_groups.new_beam_state(request)
            self.groups[request.request_id] = request.group
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def finish_request(self, request_id: int, reason: FinishReason, error: str | None = None) -> bool:
        """End one sequence now (stop string, error); frees its blocks.

        Returns False when the request is not (or no longer) in the engine.
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        request.finish(reason, error)
        self.scheduler.remove(request)
        if self.track_finished:
            self._finished.append(request)
        group = request.group
        if group is not None and all(m.is_finished for m in group.members) and (group.forked or group.size == 1):
            self.groups.pop(group.client_id, None)
        return True

    def finish_client_request(self, client_id: int, reason: FinishReason, error: str | None = None) -> list[int]:
        """End every sequence of a client request (abort); returns the ids finished."""
        group = self.groups.pop(client_id, None)
        ids = [m.request_id for m in group.members] if group is not None else [client_id]
        return [i for i in ids if self.finish_request(i, reason, error)]

    def take_finished(self) -> list[LlmRequest]:
        """Requests finished since the last call (collected only with ``track_finished``)."""
        finished, self._finished = self._finished, []
        return finished

    def step(self) -> list[RequestUpdate]:
        """Run one iteration; returns an update for every request that got tokens
        or finished (with overlap, the tokens of the previous launch)."""
        updates: list[RequestUpdate] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and _needs_committed_history(previous):
            # A request's logits processing (penalties, grammar, beam selection, ...)
            # needs the token still on the device: commit the previous step before
            # scheduling this one (no overlap this step).
            self._commit(previous, updates)
            previous = None
        output = self.scheduler.schedule()
        self.last_output = output
        launched: LaunchedStep | None = None
        if output:
            self.num_steps += 1
            try:
                launched = self._launch(output.scheduled, previous)
            except Exception as exc:  # noqa: BLE001 - the loop must survive any request
                logger.warning("step failed (%r); retrying its %d requests alone", exc, len(output.scheduled))
                if previous is not None:
                    self._commit(previous, updates)
                    previous = None
                self._retry_alone(output.scheduled, updates)
        if previous is not None:
            self._commit(previous, updates)
        if launched is not None:
            if self.overlap:
                self._in_flight = launched
            else:
                self._commit(launched, updates)
        return updates

    def _launch(self, scheduled: list[ScheduledRequest], previous: LaunchedStep | None) -> LaunchedStep | None:
        sources = self._token_sources(scheduled, previous)
        prompt_logits: dict[int, torch.Tensor] | None = None
        if any(item.request.sampling.needs_prompt_logits for item in scheduled):
            prompt_logits = {}
        logits = self.runner.execute(scheduled, self.kv_cache.block_table, sources, prompt_logits)
        for request_id, chunk in (prompt_logits or {}).items():
            request = self.requests[request_id]
            if not request.output_token_ids:  # not a recomputation after a pause
                request.prompt_logit_chunks.append(chunk)
        sampling = [item.request for item in scheduled if item.samples]
        if any(r.group is not None and not r.group.forked and not r.group.is_beam_search for r in sampling):
            sampling, rows = self._fork_groups(scheduled)
            logits = logits.index_select(0, to_device(rows, torch.long, logits.device))
        sample = None
        if sampling:
            sample = self.sampler.sample_async(logits, sampling, _pending_tokens(sampling, previous))
        for item in scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
        if sample is None:
            return None
        launched = LaunchedStep(sampling, sample)
        launched.start_copy()
        for row, request in enumerate(sampling):
            request.output_token_ids.append(PENDING_TOKEN)
            request.num_pending_tokens += 1
            launched.row_of[request.request_id] = row
        return launched

    def _fork_groups(self, scheduled: list[ScheduledRequest]) -> tuple[list[LlmRequest], list[int]]:
        """Fork the groups whose leader samples for the first time; returns the sampling
        sequences and, for each, its row of this step's logits (forked sequences share
        their leader's row)."""
        sampling: list[LlmRequest] = []
        rows: list[int] = []
        row = -1
        for item in list(scheduled):  # forked sequences are appended to `scheduled`
            if not item.samples:
                continue
            request, row = item.request, row + 1
            sampling.append(request)
            rows.append(row)
            group = request.group
            if group is None or group.forked or group.is_beam_search:
                continue  # beams fork when the first step's candidates are chosen
            request.num_computed_tokens += item.num_new_tokens  # what the forks inherit
            children = fork(request, self.kv_cache, self._new_sequence_id, self._new_grammar)
            request.num_computed_tokens -= item.num_new_tokens
            for child in children:
                child.num_computed_tokens -= item.num_new_tokens  # advanced with the leader below
                item_child = ScheduledRequest(child, item.num_new_tokens)
                scheduled.append(item_child)
                self.requests[child.request_id] = child
                self.scheduler.running.append(child)
                sampling.append(child)
                rows.append(row)
        return sampling, rows

    def _new_sequence_id(self) -> int:
        self._next_sequence_id += 1
        return self._next_sequence_id

    def _new_grammar(self, request: LlmRequest) -> object:
        stops = sorted(request.sampling.end_ids | request.sampling.stop_token_ids)
        return self.sampler.grammar_backend.new_matcher(request.sampling.guided, stop_token_ids=stops)

    @staticmethod
    def _token_sources(scheduled: list[ScheduledRequest], previous: LaunchedStep | None) -> TokenSources | None:
        """Where this step's placeholder input tokens are on the device."""
        if previous is None:
            return None
        dst: list[int] = []
        src: list[int] = []
        offset = 0
        for item in scheduled:
            request = item.request
            offset += item.num_new_tokens
            # Only a generation request's last token can be pending, and it is the
            # last input of the request this step.
            if request.num_pending_tokens and request.request_id in previous.row_of:
                dst.append(offset - 1)
                src.append(previous.row_of[request.request_id])
        return TokenSources(previous.tokens, dst, src) if dst else None

    def _commit(self, launched: LaunchedStep, updates: list[RequestUpdate]) -> None:
        try:
            outputs = launched.host_outputs()
        except Exception as exc:  # noqa: BLE001 - a device error surfaces here
            for request in launched.requests:
                if not request.is_finished:
                    self._fail(request, exc, updates)
            return
        logit_rows = {row: j for j, row in enumerate(launched.sample.generation_logit_rows)}
        beam_rows: dict[int, dict[int, int]] = {}  # beam group client id -> request id -> row
        for row, (request, token) in enumerate(zip(launched.requests, outputs["tokens"], strict=True)):
            if request.is_finished:
                continue  # finished (or aborted) while this step was in flight
            request.output_token_ids[len(request.output_token_ids) - request.num_pending_tokens] = token
            request.num_pending_tokens -= 1
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if request.sampling.use_beam_search:
                beam_rows.setdefault(request.client_id, {})[request.request_id] = row
                continue
            logprobs = None
            sampling = request.sampling
            if sampling.needs_logprobs:
                entry = launched.token_logprobs(outputs, row, token, sampling.num_logprobs or 0)
                request.cumulative_logprob += entry.logprob
                logprobs = [entry] if sampling.num_logprobs is not None else None
            if request.grammar is not None and not request.grammar.accept(token):
                self._fail(request, RuntimeError(f"token {token} violates the request's grammar"), updates)
                continue
            update = self._check_finish(request, token)
            update.logprobs = logprobs
            if sampling.needs_logprobs:
                update.cumulative_logprob = request.cumulative_logprob
            if row in logit_rows:
                update.generation_logits = outputs["generation_logits"][logit_rows[row]].unsqueeze(0)
            if request.prompt_logit_chunks:
                attach_prompt_outputs(request, update)
            updates.append(update)
        row_in_beam_outputs = {row: j for j, row in enumerate(launched.sample.beam_rows)}
        for client_id, rows in beam_rows.items():
            group = self.groups.get(client_id)
            if group is not None:
                beam_groups.advance(self, group, rows, outputs, row_in_beam_outputs, updates)

    def _retry_alone(self, scheduled: list[ScheduledRequest], updates: list[RequestUpdate]) -> None:
        for item in scheduled:
            if item.request.is_finished:
                continue
            try:
                launched = self._launch([item], None)
            except Exception as exc:  # noqa: BLE001
                self._fail(item.request, exc, updates)
                continue
            if launched is not None:
                self._commit(launched, updates)

    def _fail(self, request: LlmRequest, exc: BaseException, updates: list[RequestUpdate]) -> None:
        logger.error("request %d failed: %r", request.client_id, exc)
        message = f"{type(exc).__name__}: {exc}"
        # A failing sequence fails its whole client request.
        members = request.group.members if request.group is not None else [request]
        for member in members:
            if self.finish_request(member.request_id, FinishReason.ERROR, message):
                updates.append(self._update(member, [], FinishReason.ERROR, message))

    def _check_finish(self, request: LlmRequest, token: int) -> RequestUpdate:
        sampling = request.sampling
        num_output = request.num_committed_output_tokens
        reason: FinishReason | None = None
        if token in sampling.stop_token_ids or (not sampling.ignore_eos and token in sampling.end_ids):
            reason = FinishReason.STOP
        elif num_output >= sampling.max_tokens or request.num_prompt_tokens + num_output >= request.max_seq_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.finish_request(request.request_id, reason)
        return self._update(request, [token], reason)

    @staticmethod
    def _update(
        request: LlmRequest, tokens: list[int], reason: FinishReason | None, error: str | None = None
    ) -> RequestUpdate:
        return RequestUpdate(
            request.request_id, tokens, reason is not None, reason, error,
            client_id=request.client_id, seq_index=request.seq_index,
        )

    def shutdown(self) -> None:
        """Finish every request as cancelled and free all blocks."""
        self._in_flight = None
        for request_id in list(self.requests):
            self.finish_request(request_id, FinishReason.CANCELLED)


def _needs_committed_history(previous: LaunchedStep) -> bool:
    """True when a request of ``previous`` needs its sampled token on the host before it
    can be scheduled again."""
    return any(r.sampling.needs_history and not r.is_finished for r in previous.requests)


def attach_prompt_outputs(request: LlmRequest, update: RequestUpdate) -> None:
    """Give the request's first update its context logits and/or prompt logprobs."""
    context = torch.cat(request.prompt_logit_chunks)
    request.prompt_logit_chunks = []
    sampling = request.sampling
    if sampling.return_context_logits:
        update.context_logits = context.cpu()
    if sampling.num_prompt_logprobs is not None:
        prompt = request.prompt_token_ids
        logprobs, ranks, top = prompt_token_logprobs(context, prompt, sampling.num_prompt_logprobs)
        update.prompt_logprobs = [
            TokenLogprobs(token, logprob, rank, alternatives)
            for token, logprob, rank, alternatives in zip(prompt[1:], logprobs, ranks, top, strict=True)
        ]


def _pending_tokens(sampling: list[LlmRequest], previous: LaunchedStep | None) -> PendingTokens | None:
    """Where the penalised requests' last tokens are while still on the device."""
    if previous is None:
        return None
    rows, sources = [], []
    for row, request in enumerate(sampling):
        if request.sampling.logits_params is not None and request.num_pending_tokens:
            source = previous.row_of.get(request.request_id)
            if source is not None:
                rows.append(row)
                sources.append(source)
    if not rows:
        return None
    tokens = previous.tokens.index_select(0, to_device(sources, torch.long, previous.tokens.device))
    return PendingTokens(rows, tokens)
