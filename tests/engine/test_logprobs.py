"""Tests for rtllm.engine.logprobs.compute_logprobs against torch's log_softmax and topk."""

from __future__ import annotations

import pytest
import torch

from rtllm.engine.logprobs import compute_logprobs


@pytest.mark.parametrize("num_top", [0, 1, 5, 50])
def test_matches_log_softmax_and_topk(num_top: int) -> None:
    generator = torch.Generator().manual_seed(num_top)
    logits = torch.randn(4, 50, generator=generator) * 4
    logits[2, 7] = float("-inf")  # a banned token
    token_ids = torch.tensor([0, 49, 3, 17])
    token_logprob, top_ids, top_logprobs = compute_logprobs(logits, token_ids, num_top)

    reference = torch.log_softmax(logits.double(), dim=-1)
    expected = reference[torch.arange(4), token_ids].float()
    torch.testing.assert_close(token_logprob, expected, atol=1e-5, rtol=0)
    assert token_logprob.dtype == torch.float32 and token_logprob.shape == (4,)

    expected_top, expected_ids = reference.topk(num_top, dim=-1)
    assert top_ids.shape == top_logprobs.shape == (4, num_top)
    assert top_ids.dtype == torch.long
    assert torch.equal(top_ids, expected_ids)
    torch.testing.assert_close(top_logprobs, expected_top.float(), atol=1e-5, rtol=0)
    # The top logprobs are the logprobs of the top ids, in decreasing order.
    torch.testing.assert_close(top_logprobs, reference.float().gather(1, top_ids))
    assert bool((top_logprobs[:, :-1] >= top_logprobs[:, 1:]).all())


def test_bfloat16_logits_give_float32_logprobs() -> None:
    logits = torch.randn(2, 8).bfloat16()
    token_logprob, _, top_logprobs = compute_logprobs(logits, torch.tensor([1, 2]), 3)
    assert token_logprob.dtype == top_logprobs.dtype == torch.float32
    torch.testing.assert_close(
        token_logprob, torch.log_softmax(logits.float(), dim=-1)[[0, 1], [1, 2]]
    )


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="token_ids"):
        compute_logprobs(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="num_top"):
        compute_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="num_top"):
        compute_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), -1)
