"""Statistical tests of the sampler with fixed seeds: top-k, top-p and min-p draw only
from the allowed set, with frequencies consistent with the renormalised distribution.

Significance: each chi-square test rejects at alpha = 0.001 (critical values of the
chi-square distribution below, by degrees of freedom), with the sampler's generator
seeded, so the tests are deterministic; a correct sampler fails one with probability
0.001 for a given seed, and these seeds were not chosen after looking at results.
"""

from __future__ import annotations

import pytest
import torch

from rtllm.engine.llm_request import LlmRequest, SamplingConfig
from rtllm.engine.sampler import Sampler

# Upper 0.001 quantiles of chi-square with df = 1..10.
CHI2_CRITICAL_0_001 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59]
PROBS = [0.30, 0.22, 0.15, 0.12, 0.08, 0.06, 0.04, 0.02, 0.01]
DRAWS = 20000


def draw(config: SamplingConfig, seed: int) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), seed=seed)
    requests = [LlmRequest(i, [1], config, 64) for i in range(DRAWS)]
    logits = torch.tensor(PROBS, dtype=torch.float64).log().float().expand(DRAWS, -1).contiguous()
    return sampler.sample_async(logits, requests).tokens


def expected_distribution(config: SamplingConfig) -> torch.Tensor:
    """The renormalised distribution after temperature, top-k, top-p and min-p, by hand."""
    probs = torch.tensor(PROBS, dtype=torch.float64) ** (1.0 / config.temperature)
    probs /= probs.sum()
    keep = torch.ones(len(PROBS), dtype=torch.bool)
    if 0 < config.top_k < len(PROBS):
        keep[config.top_k :] = False  # PROBS is sorted: the k largest come first
    if config.top_p < 1.0:
        kept = probs * keep
        kept /= kept.sum()
        before = torch.cumsum(kept, 0) - kept
        keep &= before < config.top_p
    if config.min_p > 0:
        kept = probs * keep
        keep &= kept >= config.min_p * kept.max()
    probs = probs * keep
    return probs / probs.sum()


CONFIGS = [
    SamplingConfig(max_tokens=1, greedy=False),
    SamplingConfig(max_tokens=1, greedy=False, top_k=4),
    SamplingConfig(max_tokens=1, greedy=False, top_p=0.7),
    SamplingConfig(max_tokens=1, greedy=False, min_p=0.3),
    SamplingConfig(max_tokens=1, greedy=False, temperature=0.7, top_k=6, top_p=0.9, min_p=0.1),
    SamplingConfig(max_tokens=1, greedy=False, temperature=1.5, min_p=0.2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}-m{c.min_p}")
def test_draws_stay_in_the_allowed_set_with_the_right_frequencies(config: SamplingConfig) -> None:
    expected = expected_distribution(config)
    tokens = draw(config, seed=1234)
    counts = torch.bincount(tokens, minlength=len(PROBS)).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, f"drew outside the allowed set {allowed.nonzero().flatten().tolist()}"
    observed, wanted = counts[allowed], expected[allowed] * DRAWS
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    df = int(allowed.sum()) - 1
    if df > 0:
        assert chi2 < CHI2_CRITICAL_0_001[df - 1], f"chi2={chi2:.1f} with {df} dof; counts {observed.tolist()}"


def test_chi_square_detects_a_wrong_distribution() -> None:
    """The test above has power: plain sampling's counts are far from top-k's distribution."""
    expected = expected_distribution(SamplingConfig(max_tokens=1, greedy=False, top_k=4))
    counts = torch.bincount(draw(CONFIGS[0], seed=1234), minlength=len(PROBS)).double()
    allowed = expected > 0
    assert counts[~allowed].sum() > 0
    wanted = expected[allowed] * DRAWS
    chi2 = float(((counts[allowed] - wanted) ** 2 / wanted).sum())
    assert chi2 > CHI2_CRITICAL_0_001[int(allowed.sum()) - 2]
