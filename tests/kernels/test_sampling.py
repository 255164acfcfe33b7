"""sample_tokens (on-device batched sampling) against Sampler and a row-by-row reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from rtllm.engine.llm_request import LlmRequest, SamplingConfig
from rtllm.engine.sampler import Sampler
from rtllm.kernels.sampling import filtered_probs, sample_tokens, sample_tokens_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_ids = itertools.count()

# (greedy, temperature, top_k, top_p): every filter alone and together, and greedy rows.
CONFIGS = [
    (True, 0.0, 0, 1.0),
    (False, 1.0, 0, 1.0),
    (False, 0.7, 5, 1.0),
    (False, 1.3, 0, 0.9),
    (False, 0.5, 20, 0.8),
    (True, 1.0, 1, 1.0),
    (False, 1.0, 1, 1.0),
    (False, 2.0, 10_000, 0.3),  # top_k beyond the vocab: disabled
    (False, 1e-8, 0, 1.0),  # temperature clamped to 1e-6
]


def _requests(configs: list[tuple[bool, float, int, float]], seed: int = 100) -> list[LlmRequest]:
    return [
        LlmRequest(
            next(_ids),
            [1],
            SamplingConfig(16, temperature=t, top_k=k, top_p=p, greedy=g, seed=seed + i),
            1024,
        )
        for i, (g, t, k, p) in enumerate(configs)
    ]


def _params(
    requests: list[LlmRequest], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = [r.sampling for r in requests]
    return (
        torch.tensor([c.temperature for c in s], device=device),
        torch.tensor([c.top_k for c in s], device=device),
        torch.tensor([c.top_p for c in s], device=device),
        torch.tensor([c.greedy for c in s], device=device),
    )


def _logits(batch: int, vocab: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(batch, vocab, generator=gen)).to(device)


def test_filtered_probs_equal_samplers() -> None:
    requests = _requests(CONFIGS)
    logits = _logits(len(requests), 300, seed=0)
    temperature, top_k, top_p, _ = _params(requests)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    assert torch.equal(probs, Sampler.filtered_probs(logits, requests))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_filtered_probs_and_exponential_race(seed: int) -> None:
    """Given the same noise, each row's token is Sampler's: argmax(filtered_probs / noise)."""
    requests = _requests(CONFIGS)
    logits = _logits(len(requests), 300, seed=seed)
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(seed))
    tokens = sample_tokens(logits, *_params(requests), noise)
    sampled = [i for i, r in enumerate(requests) if not r.sampling.greedy]
    probs = Sampler.filtered_probs(logits[sampled], [requests[i] for i in sampled])
    expected = logits.argmax(dim=-1)
    expected[sampled] = (probs / noise[sampled]).argmax(dim=-1)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens, sample_tokens_ref(logits, *_params(requests), noise))


def test_equals_sampler_sample_with_seeded_requests() -> None:
    """End to end: noise drawn from each request's own generator, as Sampler draws it."""
    requests = _requests(CONFIGS, seed=7)
    logits = _logits(len(requests), 500, seed=3)
    noise = torch.ones_like(logits)
    for i, r in enumerate(requests):
        if not r.sampling.greedy:
            noise[i].exponential_(generator=torch.Generator().manual_seed(r.sampling.seed))
    tokens = sample_tokens(logits, *_params(requests), noise)
    assert tokens.tolist() == Sampler(torch.device("cpu")).sample(logits, requests)


def test_top_k_one_and_tiny_temperature_are_argmax() -> None:
    requests = _requests([(False, 1.0, 1, 1.0), (False, 1e-8, 0, 1.0), (False, 0.5, 1, 0.1)])
    logits = _logits(3, 64, seed=4)
    for seed in range(3):
        noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_tokens(logits, *_params(requests), noise), logits.argmax(-1))


def test_draws_stay_inside_the_kept_set() -> None:
    requests = _requests([(False, 1.0, 3, 1.0), (False, 1.0, 0, 0.5)] * 4)
    logits = _logits(len(requests), 50, seed=5)
    temperature, top_k, top_p, greedy = _params(requests)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = sample_tokens(logits, temperature, top_k, top_p, greedy, generator=gen)
        assert (probs.gather(1, tokens.unsqueeze(1)) > 0).all()
    assert ((probs > 0).sum(-1)[::2] == 3).all()


def test_apply_filters_false_when_no_row_filters() -> None:
    requests = _requests([(False, 0.8, 0, 1.0), (True, 0.0, 0, 1.0), (False, 1.5, 0, 1.0)])
    logits = _logits(3, 100, seed=6).half()
    noise = torch.empty(3, 100).exponential_(generator=torch.Generator().manual_seed(1))
    full = sample_tokens(logits, *_params(requests), noise)
    assert torch.equal(full, sample_tokens(logits, *_params(requests), noise, apply_filters=False))


def test_rejects_bad_inputs() -> None:
    requests = _requests(CONFIGS[:2])
    temperature, top_k, top_p, greedy = _params(requests)
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top_k must be"):
        sample_tokens(logits, temperature, top_k[:1], top_p, greedy)
    with pytest.raises(ValueError, match="greedy_mask must be bool"):
        sample_tokens(logits, temperature, top_k, top_p, greedy.int())
    with pytest.raises(ValueError, match="integer"):
        sample_tokens(logits, temperature, top_k.float(), top_p, greedy)
    with pytest.raises(ValueError, match="noise must be"):
        sample_tokens(logits, temperature, top_k, top_p, greedy, torch.ones(2, 9))


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_no_host_sync_and_matches_sampler(dtype: torch.dtype) -> None:
    requests = _requests(CONFIGS * 8)
    logits = _logits(len(requests), 128_256, seed=7, device="cuda").to(dtype)
    params = _params(requests, "cuda")
    noise = torch.empty(logits.shape, device="cuda").exponential_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_tokens(logits, *params, noise)
        gen_tokens = sample_tokens(logits, *params)  # noise drawn inside
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda" and gen_tokens.shape == tokens.shape
    sampled = [i for i, r in enumerate(requests) if not r.sampling.greedy]
    probs = Sampler.filtered_probs(logits.float()[sampled], [requests[i] for i in sampled])
    expected = logits.argmax(dim=-1)
    expected[sampled] = (probs / noise[sampled]).argmax(dim=-1)
    assert torch.equal(tokens, expected)
