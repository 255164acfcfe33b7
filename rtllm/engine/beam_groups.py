"""Runs beam search groups inside the engine: after each step, the group's beams are
re-chosen on the host (:class:`rtllm.engine.beam_search.BeamState`) and their KV block
tables rebuilt (shared full blocks, copied partial ones), or the group finishes and its
best hypotheses become the request's outputs.

Beams are ordinary requests to the scheduler, always scheduled together, never paused,
and always committed before the next step (their inputs depend on the selection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rtllm.engine.beam_search import BeamState, Hypothesis
from rtllm.engine.llm_request import FinishReason, LlmRequest
from rtllm.engine.sequence_group import SequenceGroup, fork
from rtllm.engine.step_output import RequestUpdate

if TYPE_CHECKING:
    from rtllm.engine.engine import Engine


def new_beam_state(request: LlmRequest) -> BeamState:
    sampling = request.sampling
    max_new = min(sampling.max_tokens, request.max_seq_len - request.num_prompt_tokens)
    return BeamState(
        width=sampling.num_sequences,
        max_new_tokens=max_new,
        length_penalty=sampling.length_penalty,
        early_stopping=sampling.early_stopping,
        end_ids=frozenset() if sampling.ignore_eos else sampling.end_ids | sampling.stop_token_ids,
    )


def advance(engine: Engine, group: SequenceGroup, rows: dict[int, int], outputs: dict[str, Any],
            beam_row_of: dict[int, int], updates: list[RequestUpdate]) -> None:
    """One beam step for ``group``: ``rows`` maps each live beam's request id to its row
    in the step's outputs (all live beams sampled this step)."""
    state: BeamState = group.beam
    beams = [m for m in group.members if not m.is_finished]
    histories = [list(b.output_token_ids[:-1]) for b in beams]  # drop this step's placeholder
    top_ids = [outputs["beam_top_ids"][beam_row_of[rows[b.request_id]]] for b in beams]
    top_logprobs = [outputs["beam_top_logprobs"][beam_row_of[rows[b.request_id]]] for b in beams]
    chosen = state.step(histories, top_ids, top_logprobs)
    if state.done:
        _finish(engine, group, beams, updates)
        return
    if not group.forked:
        children = fork(beams[0], engine.kv_cache, engine._new_sequence_id)
        for child in children:
            engine.requests[child.request_id] = child
            engine.scheduler.running.append(child)
        beams = beams + children
    else:
        parents = [beams[parent].request_id for parent, _ in chosen]
        assignments = [(beams[slot].request_id, parent) for slot, parent in enumerate(parents)]
        engine.kv_cache.reassign(assignments, beams[0].num_computed_tokens)
    for slot, (parent, token) in enumerate(chosen):
        beam = beams[slot]
        beam.output_token_ids = histories[parent] + [token]
        beam.num_pending_tokens = 0
        beam.cumulative_logprob = state.running_scores[slot]
    for surplus in beams[len(chosen):]:  # fewer live candidates than beams (tiny vocabularies)
        engine.finish_request(surplus.request_id, FinishReason.CANCELLED)


def _finish(engine: Engine, group: SequenceGroup, beams: list[LlmRequest], updates: list[RequestUpdate]) -> None:
    num_returned = group.members[0].sampling.num_returned
    for beam in beams:
        engine.finish_request(beam.request_id, FinishReason.STOP)
    engine.groups.pop(group.client_id, None)
    hypotheses = group.beam.results(num_returned)
    # Defensive: a search cut short keeps its best live beams as unfinished hypotheses.
    for beam in sorted(beams, key=lambda b: -b.cumulative_logprob)[: num_returned - len(hypotheses)]:
        hypotheses.append(Hypothesis(list(beam.output_token_ids[:-1]), beam.cumulative_logprob, 0.0, False))
    for index, hypothesis in enumerate(hypotheses):
        reason = FinishReason.STOP if hypothesis.ended_by_end_id else FinishReason.LENGTH
        request_id = group.client_id if index == 0 else engine._new_sequence_id()
        updates.append(
            RequestUpdate(
                request_id, hypothesis.token_ids, True, reason,
                cumulative_logprob=hypothesis.cumulative_logprob, client_id=group.client_id, seq_index=index,
            )
        )
