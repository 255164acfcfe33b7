"""Splitting one engine step into pipeline micro-batches.

With ``pp_size > 1`` a step's sequences are cut into up to ``pp_size`` contiguous
groups of about equal token counts. Stage ``s`` runs micro-batch ``m`` while stage
``s + 1`` runs ``m - 1`` (sends do not wait), so for ``k`` micro-batches over ``p``
stages a step takes about ``(k + p - 1) / k`` of one stage's whole-batch time per
stage instead of ``p`` times it.
"""

from __future__ import annotations

from itertools import accumulate

from rtllm.layers.attention_backends import StepAttentionInputs
from rtllm.runtime.model_runner import StepInputs


def micro_batch_bounds(query_lens: list[int], parts: int) -> list[int]:
    """Sequence boundaries ``[0, b1, ..., n]`` of at most ``parts`` non-empty contiguous
    micro-batches whose token counts are as even as a greedy cut makes them."""
    n = len(query_lens)
    parts = max(1, min(parts, n))
    total = sum(query_lens)
    bounds = [0]
    seen = 0
    for i, count in enumerate(query_lens[:-1]):
        seen += count
        cut = len(bounds)  # the boundary this would be
        if cut >= parts:
            break
        left = n - (i + 1)  # sequences after this one
        # Cut at the micro-batch's share of tokens, or when every later sequence must
        # become a micro-batch of its own; never leave a later micro-batch empty.
        if left >= parts - cut and (seen * parts >= total * cut or left == parts - cut):
            bounds.append(i + 1)
    bounds.append(n)
    return bounds


def slice_step(step: StepInputs, first: int, end: int) -> tuple[StepInputs, int, int]:
    """Sequences ``[first, end)`` of ``step`` as a step of their own, and the token range
    ``[token_start, token_end)`` they occupy in ``step`` (their logits rows are rebased)."""
    attention = step.attention
    offsets = [0, *accumulate(attention.query_lens)]
    token_start, token_end = offsets[first], offsets[end]
    part = StepInputs(
        step.input_ids[token_start:token_end],
        step.positions[token_start:token_end],
        StepAttentionInputs(
            attention.query_lens[first:end],
            attention.context_lens[first:end],
            attention.block_tables[first:end],
            attention.tokens_per_block,
            attention.device,
        ),
        [i - token_start for i in step.logits_indices if token_start <= i < token_end],
    )
    return part, token_start, token_end
