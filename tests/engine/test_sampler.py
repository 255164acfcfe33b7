"""Tests for rtllm.engine.sampler.Sampler."""

from __future__ import annotations

import math

import pytest
import torch

from rtllm.engine.llm_request import LlmRequest, SamplingConfig
from rtllm.engine.sampler import Sampler

CPU = torch.device("cpu")
_next_id = iter(range(10**9))


def make(
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> LlmRequest:
    config = SamplingConfig(
        max_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed
    )
    return LlmRequest(next(_next_id), [1], config, 1024)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ---- greedy ---------------------------------------------------------------------------


def test_all_greedy_is_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    sampler = Sampler(CPU, seed=0)
    assert (
        sampler.sample(logits, [make(greedy=True) for _ in range(6)]) == logits.argmax(-1).tolist()
    )


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    g = torch.Generator().manual_seed(2)
    sampler = Sampler(CPU, seed=0)
    for _ in range(20):
        logits = torch.randn(5, 40, generator=g)
        requests = [make(greedy=True), make(), make(greedy=True), make(top_k=3), make(greedy=True)]
        tokens = sampler.sample(logits, requests)
        expected = logits.argmax(-1).tolist()
        assert [tokens[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
        top3 = set(logits[3].topk(3).indices.tolist())
        assert tokens[3] in top3
        assert all(isinstance(t, int) for t in tokens)


def test_greedy_accepts_half_precision_logits() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]], dtype=torch.float16)
    sampler = Sampler(CPU)
    assert sampler.sample(logits, [make(greedy=True), make(greedy=True)]) == [1, 0]
    assert sampler.sample(logits, [make(greedy=True), make(top_k=1)]) == [1, 0]


def test_top_k_one_is_argmax_even_when_not_flagged_greedy() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 100, generator=g)
    tokens = Sampler(CPU).sample(logits, [make(top_k=1, temperature=2.0) for _ in range(30)])
    assert tokens == logits.argmax(-1).tolist()


# ---- seeds ----------------------------------------------------------------------------


def _seeded_run(seed: int, layout: str, steps: int = 25) -> list[int]:
    """Sample ``steps`` tokens for a request with ``seed``, placed in a batch per ``layout``."""
    g = torch.Generator().manual_seed(100)
    step_logits = [torch.randn(64, generator=g) for _ in range(steps)]
    noise_gen = torch.Generator().manual_seed(999)
    sampler = Sampler(CPU, seed=5 if layout != "alone" else 6)
    target = make(seed=seed, temperature=1.3, top_p=0.95)
    out = []
    for logits in step_logits:
        if layout == "alone":
            requests = [target]
        elif layout == "last":
            requests = [make(), make(greedy=True), make(seed=seed + 1), target]
        else:  # "first", with other seeded rows and a different batch size
            requests = [target, make(seed=seed), make(top_k=4)]
        batch = torch.randn(len(requests), 64, generator=noise_gen)
        row = requests.index(target)
        batch[row] = logits
        out.append(sampler.sample(batch, requests)[row])
    return out


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    alone = _seeded_run(1234, "alone")
    assert _seeded_run(1234, "last") == alone
    assert _seeded_run(1234, "first") == alone
    assert _seeded_run(1234, "alone") == alone
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_differ() -> None:
    runs = {tuple(_seeded_run(seed, "alone")) for seed in (1, 2, 3, 4)}
    assert len(runs) == 4


def test_seeded_request_keeps_its_own_generator() -> None:
    sampler = Sampler(CPU)
    r = make(seed=7)
    assert r.generator is None
    sampler.sample(torch.zeros(1, 10), [r])
    assert isinstance(r.generator, torch.Generator)
    first = r.generator
    sampler.sample(torch.zeros(1, 10), [r])
    assert r.generator is first


def test_unseeded_requests_follow_the_sampler_seed() -> None:
    logits = torch.zeros(8, 128)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(CPU, seed=seed)
        return [t for _ in range(5) for t in sampler.sample(logits, [make() for _ in range(8)])]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_uniform_logits_cover_vocab() -> None:
    vocab = 8
    tokens = Sampler(CPU, seed=0).sample(torch.zeros(4000, vocab), [make() for _ in range(4000)])
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float() / 4000
    assert torch.all((counts - 1 / vocab).abs() < 0.03), counts


# ---- top-k / top-p by sampling ----------------------------------------------------------


def test_top_k_never_outside_k_largest() -> None:
    g = torch.Generator().manual_seed(4)
    row = torch.randn(200, generator=g) * 0.3  # fairly flat: the tail would be hit often
    n = 3000
    tokens = Sampler(CPU, seed=0).sample(row.repeat(n, 1), [make(top_k=5) for _ in range(n)])
    allowed = set(row.topk(5).indices.tolist())
    assert set(tokens) == allowed


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [
        (0.3, [0]),
        (0.45, [0]),
        (0.6, [0, 1]),
        (0.8, [0, 1, 2]),
        (0.9, [0, 1, 2, 3]),
        (0.97, [0, 1, 2, 3, 4]),
        (1.0, [0, 1, 2, 3, 4]),
    ],
)
def test_top_p_never_outside_nucleus(top_p: float, nucleus: list[int]) -> None:
    probs = [0.5, 0.25, 0.13, 0.07, 0.05]  # masses before: 0, .5, .75, .88, .95
    # Shuffle the vocabulary so sorting matters: position perm[i] has probs[i].
    perm = [3, 0, 4, 1, 2]
    row = torch.full((5,), 0.0)
    for i, p in enumerate(probs):
        row[perm[i]] = math.log(p)
    n = 10000
    tokens = torch.tensor(
        Sampler(CPU, seed=0).sample(row.repeat(n, 1), [make(top_p=top_p) for _ in range(n)])
    )
    allowed = {perm[i] for i in nucleus}
    assert set(tokens.tolist()) == allowed
    mass = sum(probs[i] for i in nucleus)
    freq = torch.bincount(tokens, minlength=5).double() / n
    for i in nucleus:
        assert abs(freq[perm[i]].item() - probs[i] / mass) < 0.02


def test_temperature_concentrates_or_flattens() -> None:
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    n = 4000
    sampler = Sampler(CPU, seed=0)

    def argmax_share(temperature: float) -> float:
        tokens = torch.tensor(
            sampler.sample(row.repeat(n, 1), [make(temperature=temperature) for _ in range(n)])
        )
        return (tokens == 0).double().mean().item()

    low, normal, high = argmax_share(0.05), argmax_share(1.0), argmax_share(20.0)
    assert low > 0.999
    expected_normal = row.softmax(-1)[0].item()  # ~0.53
    assert abs(normal - expected_normal) < 0.03
    assert abs(high - (row / 20).softmax(-1)[0].item()) < 0.03
    assert low > normal > high


def test_tiny_temperature_is_argmax() -> None:
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(50, 30, generator=g)
    tokens = Sampler(CPU).sample(logits, [make(temperature=1e-4) for _ in range(50)])
    assert tokens == logits.argmax(-1).tolist()


# ---- filtered_probs ---------------------------------------------------------------------


def test_filtered_probs_without_filters_is_softmax() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 20, generator=g)
    probs = Sampler.filtered_probs(logits, [make(), make(temperature=0.5), make(temperature=2.0)])
    expected = torch.stack(
        [logits[0].softmax(-1), (logits[1] / 0.5).softmax(-1), (logits[2] / 2.0).softmax(-1)]
    )
    torch.testing.assert_close(probs, expected)


def test_filtered_probs_top_k_zeros_exactly_the_rest() -> None:
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(1, 30, generator=g)
    probs = Sampler.filtered_probs(logits, [make(top_k=4)])[0]
    keep = logits[0].topk(4).indices
    assert set(probs.nonzero().flatten().tolist()) == set(keep.tolist())
    expected = torch.zeros(30)
    expected[keep] = logits[0][keep].softmax(-1)
    torch.testing.assert_close(probs, expected)


def test_filtered_probs_top_k_at_or_above_vocab_keeps_all() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    for k in (3, 4, 1000):
        probs = Sampler.filtered_probs(logits, [make(top_k=k)])
        torch.testing.assert_close(probs, logits.softmax(-1))


def test_filtered_probs_top_p_exact_nucleus() -> None:
    probs_in = [0.0625, 0.5, 0.125, 0.25, 0.0625]
    logits = logits_of(probs_in).unsqueeze(0)
    probs = Sampler.filtered_probs(logits, [make(top_p=0.7)])[0]
    # Sorted: 0.5 (1), 0.25 (3), 0.125 (2): mass before the 3rd is 0.75 >= 0.7.
    assert probs.nonzero().flatten().tolist() == [1, 3]
    torch.testing.assert_close(probs, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3, 0.0]))


def test_filtered_probs_top_p_always_keeps_top_token() -> None:
    logits = logits_of([0.1, 0.9]).unsqueeze(0)
    probs = Sampler.filtered_probs(logits, [make(top_p=0.01)])[0]
    torch.testing.assert_close(probs, torch.tensor([0.0, 1.0]))


def test_filtered_probs_top_p_applies_after_top_k_renormalisation() -> None:
    # Top-3 renormalised: 4/7, 2/7, 1/7; with top_p=0.8 the third (mass before 6/7) goes.
    logits = logits_of([0.5, 0.25, 0.125, 0.0625, 0.0625]).unsqueeze(0)
    probs = Sampler.filtered_probs(logits, [make(top_k=3, top_p=0.8)])[0]
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0, 0.0]))


def test_filtered_probs_temperature_applies_before_top_p() -> None:
    # At temperature 0.5 the probabilities become proportional to p**2:
    # 0.49/0.54, 0.04/0.54, 0.01/0.54 -> the top token alone is >= 0.8.
    logits = logits_of([0.7, 0.2, 0.1]).unsqueeze(0)
    warm = Sampler.filtered_probs(logits, [make(top_p=0.8)])[0]
    assert warm.nonzero().flatten().tolist() == [0, 1]
    cold = Sampler.filtered_probs(logits, [make(top_p=0.8, temperature=0.5)])[0]
    assert cold.nonzero().flatten().tolist() == [0]


def test_filtered_probs_per_row_parameters() -> None:
    logits = logits_of([0.4, 0.3, 0.2, 0.1]).unsqueeze(0).repeat(4, 1)
    probs = Sampler.filtered_probs(
        logits, [make(top_k=2), make(top_p=0.5), make(), make(top_k=3, top_p=0.75)]
    )
    nonzero = [row.nonzero().flatten().tolist() for row in probs]
    assert nonzero == [[0, 1], [0, 1], [0, 1, 2, 3], [0, 1]]
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(probs[2], logits[2].softmax(-1))


def test_filtered_probs_top_p_disabled_row_unaffected_by_batch() -> None:
    logits = torch.tensor([[0.0, 0.0, -30.0], [0.0, 0.0, -30.0]])
    alone = Sampler.filtered_probs(logits[:1], [make()])[0]
    assert alone[2] > 0
    mixed = Sampler.filtered_probs(logits, [make(), make(top_p=0.9)])[0]
    assert mixed[2] > 0
