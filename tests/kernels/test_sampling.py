"""Device-side sampling: the batched filter ops, and Sampler.sample_async without host syncs."""

from __future__ import annotations

import itertools

import pytest
import torch

from rtllm.engine.llm_request import LlmRequest, SamplingConfig
from rtllm.engine.sampler import Sampler
from rtllm.kernels.sampling import filtered_probs

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



@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_sampler_launch_has_no_host_sync(dtype: torch.dtype) -> None:
    """Greedy, seeded and unseeded rows in one batch: launching the sampling never
    waits for the device (the overlap loop relies on it)."""
    requests = _requests(CONFIGS * 8)
    for request in requests[::3]:
        request.sampling.seed = None
    sampler = Sampler(torch.device("cuda"), seed=5)
    logits = _logits(len(requests), 128_256, seed=7, device="cuda").to(dtype)
    sampler.sample_async(logits, requests)  # first call creates the per-request generators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler.sample_async(logits, requests).tokens
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = tokens.cpu()
    greedy = [i for i, r in enumerate(requests) if r.sampling.greedy]
    assert torch.equal(tokens[greedy], logits.argmax(dim=-1).cpu()[greedy])
    if dtype == torch.float32:  # bf16 logits tie often: which of the tied tokens is kept varies
        sampled = [i for i, r in enumerate(requests) if not r.sampling.greedy]
        probs = Sampler.filtered_probs(logits.float()[sampled], [requests[i] for i in sampled]).cpu()
        assert bool((probs[torch.arange(len(sampled)), tokens[sampled]] > 0).all())
