"""Pipeline micro-batches: contiguous, non-empty, token-balanced; slices rebase rows."""

from __future__ import annotations

import pytest
import torch

from rtllm.distributed.micro_batch import micro_batch_bounds, slice_step
from rtllm.layers.attention_backends import StepAttentionInputs
from rtllm.runtime.model_runner import StepInputs


@pytest.mark.parametrize(
    ("query_lens", "parts", "expected"),
    [
        ([1, 1, 1, 1], 2, [0, 2, 4]),
        ([1, 1, 1, 1], 4, [0, 1, 2, 3, 4]),
        ([1, 1], 4, [0, 1, 2]),  # never more micro-batches than sequences
        ([100, 1, 1, 1], 2, [0, 1, 4]),
        ([1, 1, 1, 100], 2, [0, 3, 4]),
        ([5], 3, [0, 1]),
        ([3, 3, 3], 1, [0, 3]),
    ],
)
def test_bounds(query_lens, parts, expected):
    assert micro_batch_bounds(query_lens, parts) == expected


@pytest.mark.parametrize("seed", range(20))
def test_bounds_invariants(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=gen))
    lens = torch.randint(1, 50, (n,), generator=gen).tolist()
    parts = int(torch.randint(1, 6, (1,), generator=gen))
    bounds = micro_batch_bounds(lens, parts)
    assert bounds[0] == 0 and bounds[-1] == n
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))  # non-empty
    assert len(bounds) - 1 == min(parts, n)


def test_slice_step_rebases_tokens_and_logits_rows():
    attention = StepAttentionInputs([3, 1, 2], [0, 7, 4], [[0], [1, 2], [3]], 8, torch.device("cpu"))
    # Sequence 0 is a chunk that does not sample; 1 and 2 sample their last token.
    step = StepInputs([10, 11, 12, 20, 30, 31], [0, 1, 2, 7, 4, 5], attention, [3, 5])
    part, start, end = slice_step(step, 1, 3)
    assert (start, end) == (3, 6)
    assert part.input_ids == [20, 30, 31] and part.positions == [7, 4, 5]
    assert part.attention.query_lens == [1, 2] and part.attention.block_tables == [[1, 2], [3]]
    assert part.logits_indices == [0, 2]
    first, start, end = slice_step(step, 0, 1)
    assert (start, end, first.logits_indices) == (0, 3, [])
