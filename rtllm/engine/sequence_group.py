"""Several sequences sampled from one prompt (``n`` / ``best_of``), sharing its KV.

Only sequence 0 (the *leader*, whose request id is the client's) is queued and
computes the prompt. At its first sampling step the engine forks the group: the
other sequences are created with the leader's progress, their block tables share
the leader's full prompt blocks by reference count, and the partly filled last
block is copied (copy-on-write at the first block they would write differently).
The first token of every sequence is then drawn from the same prompt logits row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.llm_request import LlmRequest, RequestState


@dataclass(eq=False)
class SequenceGroup:
    """The sequences of one client request."""

    client_id: int
    size: int  # sequences generated (best_of, or n)
    members: list[LlmRequest] = field(default_factory=list)
    forked: bool = False
    beam: Any = None  # a BeamState when the group is a beam search

    @property
    def is_beam_search(self) -> bool:
        return self.beam is not None

    @property
    def pending_slots(self) -> int:
        """Batch slots (and reservations) the group still needs beyond its leader."""
        return 0 if self.forked else self.size - 1


def fork(
    leader: LlmRequest,
    kv_cache: KVCacheManager,
    new_id: Callable[[], int],
    new_grammar: Callable[[LlmRequest], object] | None = None,
) -> list[LlmRequest]:
    """Create the group's other sequences from ``leader`` (which has just computed its
    prompt) and give them the leader's KV; returns them in sequence order."""
    group: SequenceGroup = leader.group
    children = []
    for index in range(1, group.size):
        seed = leader.sampling.seed
        sampling = dataclasses.replace(leader.sampling, seed=None if seed is None else seed + index)
        child = LlmRequest(
            new_id(),
            leader.prompt_token_ids,
            sampling,
            leader.max_seq_len,
            priority=leader.priority,
            cache_salt=leader.cache_salt,
            arrival_time=leader.arrival_time,
            group=group,
            seq_index=index,
        )
        child.num_computed_tokens = leader.num_computed_tokens
        child.num_cached_tokens = leader.num_cached_tokens
        child.state = RequestState.RUNNING
        if new_grammar is not None and leader.grammar is not None:
            child.grammar = new_grammar(child)
        kv_cache.fork(leader.request_id, child)
        children.append(child)
    group.members.extend(children)
    group.forked = True
    return children
