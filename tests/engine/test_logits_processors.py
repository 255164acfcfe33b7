"""Tests for rtllm.engine.logits_processors against transformers' logits processors.

Each batch mixes rows with different parameters (and no-op rows); every row is compared
with transformers' processors applied to that row alone, in the documented order.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from rtllm.engine.logits_processors import LogitsParams, apply_min_p, process_logits

VOCAB = 40


def reference_row(
    logits: torch.Tensor, p: LogitsParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """One row processed by transformers (and the OpenAI formula), in rtllm's order."""
    scores = logits.clone().unsqueeze(0)
    full = torch.tensor([prompt + output], dtype=torch.long)
    if p.embedding_bias is not None:
        bias = [[[token], value] for token, value in enumerate(p.embedding_bias.tolist())]
        scores = SequenceBiasLogitsProcessor(bias)(full, scores)
    bad = [[t] for t in sorted(p.bad_token_ids)] + [list(s) for s in p.bad_sequences]
    if bad:
        # rtllm matches bad sequences against the output only, so that is transformers' input.
        outputs = torch.tensor([output], dtype=torch.long).reshape(1, len(output))
        scores = NoBadWordsLogitsProcessor(bad)(outputs, scores)
    if p.min_tokens and p.end_ids:
        scores = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, sorted(p.end_ids))(
            full, scores
        )
    if p.no_repeat_ngram_size:
        scores = NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size)(full, scores)
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(full, scores)
    for token, count in Counter(output).items():
        scores[0, token] -= p.frequency_penalty * count + p.presence_penalty
    return scores[0]


def random_history(rng: random.Random, alphabet: int, low: int, high: int) -> list[int]:
    return [rng.randrange(alphabet) for _ in range(rng.randint(low, high))]


def check_batch(
    params: list[LogitsParams],
    seed: int,
    *,
    alphabet: int = 6,
    min_output: int = 0,
    max_output: int = 12,
) -> None:
    """Random logits and histories (a small alphabet, so tokens and n-grams repeat)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    prompts = [random_history(rng, alphabet, 1, 10) for _ in params]
    outputs = [random_history(rng, alphabet, min_output, max_output) for _ in params]
    logits = torch.randn(len(params), VOCAB) * 3
    original = logits.clone()
    result = process_logits(logits, params, prompts, outputs)
    assert result is logits  # documented: in place
    for i, p in enumerate(params):
        expected = reference_row(original[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(result[i], expected, atol=1e-5, rtol=0, msg=f"row {i}: {p}")
        if p.is_noop:
            assert torch.equal(result[i], original[i])


NOOP = LogitsParams()
SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty(seed: int) -> None:
    penalties = [1.0, 1.3, 0.7, 2.0, 1.0]
    check_batch([LogitsParams(repetition_penalty=r) for r in penalties], seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty_every_row(seed: int) -> None:
    check_batch([LogitsParams(repetition_penalty=r) for r in (1.5, 1.1, 0.9)], seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_no_repeat_ngram(seed: int) -> None:
    sizes = [0, 1, 2, 3, 4, 2, 0]
    check_batch([LogitsParams(no_repeat_ngram_size=n) for n in sizes], seed, alphabet=3)


@pytest.mark.parametrize("seed", SEEDS)
def test_no_repeat_ngram_longer_than_history(seed: int) -> None:
    # Histories of 1 to 4 tokens against n up to 6: rows with fewer than n tokens are untouched.
    rng = random.Random(seed)
    params = [LogitsParams(no_repeat_ngram_size=rng.randint(1, 6)) for _ in range(6)]
    check_batch(params, seed, alphabet=2, max_output=3)


@pytest.mark.parametrize("seed", SEEDS)
def test_min_tokens(seed: int) -> None:
    params = [
        LogitsParams(min_tokens=5, end_ids=frozenset({2})),
        LogitsParams(min_tokens=100, end_ids=frozenset({0, 3, 7})),
        LogitsParams(min_tokens=1, end_ids=frozenset({1})),
        LogitsParams(min_tokens=3),  # no end ids: a no-op
        NOOP,
    ]
    check_batch(params, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_bad_words(seed: int) -> None:
    params = [
        LogitsParams(bad_token_ids=frozenset({0, 5})),
        LogitsParams(bad_sequences=((1, 2), (3, 4, 5), (9,))),
        NOOP,
        LogitsParams(bad_token_ids=frozenset({39}), bad_sequences=((2, 2, 2, 8), (0, 1))),
    ]
    check_batch(params, seed, alphabet=3, min_output=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_embedding_bias(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    biases = [torch.randn(VOCAB, generator=generator) for _ in range(2)]
    params = [
        NOOP,
        LogitsParams(embedding_bias=biases[0]),
        LogitsParams(embedding_bias=biases[1].double()),
    ]
    check_batch(params, seed)
    check_batch([LogitsParams(embedding_bias=b) for b in biases], seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_presence_and_frequency(seed: int) -> None:
    params = [
        LogitsParams(presence_penalty=0.5),
        LogitsParams(frequency_penalty=1.5),
        NOOP,
        LogitsParams(presence_penalty=-1.0, frequency_penalty=0.25),
        LogitsParams(presence_penalty=2.0, frequency_penalty=-2.0),
    ]
    check_batch(params, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_everything_at_once(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    params = [
        NOOP,
        LogitsParams(
            repetition_penalty=1.2,
            presence_penalty=0.3,
            frequency_penalty=0.4,
            no_repeat_ngram_size=2,
            min_tokens=50,
            end_ids=frozenset({4}),
            bad_token_ids=frozenset({6}),
            bad_sequences=((1, 2),),
            embedding_bias=torch.randn(VOCAB, generator=generator),
        ),
        LogitsParams(repetition_penalty=0.8, no_repeat_ngram_size=3, frequency_penalty=-0.5),
        NOOP,
        LogitsParams(presence_penalty=1.0, embedding_bias=torch.randn(VOCAB, generator=generator)),
        LogitsParams(min_tokens=2, end_ids=frozenset({0}), bad_sequences=((0, 1, 2),)),
    ]
    check_batch(params, seed, alphabet=4)


def test_examples_by_hand() -> None:
    params = [
        LogitsParams(no_repeat_ngram_size=3),
        LogitsParams(bad_sequences=((5, 6, 7),)),
        LogitsParams(bad_sequences=((5, 6, 7),)),
        LogitsParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5),
    ]
    prompts = [[1, 2, 3, 1], [0], [0, 5, 6], [1, 2]]
    outputs = [[2], [5, 6], [], [2, 2]]
    logits = torch.full((4, 10), 4.0)
    process_logits(logits, params, prompts, outputs)
    inf = float("-inf")
    # History 1 2 3 1 2 ends with "1 2", which was followed by 3.
    assert logits[0].tolist() == [4.0] * 3 + [inf] + [4.0] * 6
    # The output ends with 5 6: ban 7. Only the output counts: the prompt's 5 6 does not.
    assert logits[1].tolist() == [4.0] * 7 + [inf] + [4.0] * 2
    assert logits[2].tolist() == [4.0] * 10
    # Token 1 (prompt only): 4 / 2. Token 2 (prompt, output twice): 4 / 2 - 0.5 * 2 - 1.
    assert logits[3].tolist() == [4.0, 2.0, 0.0] + [4.0] * 7


def test_min_tokens_boundary() -> None:
    """End ids are banned while fewer than min_tokens tokens were generated, not after."""
    params = [LogitsParams(min_tokens=3, end_ids=frozenset({1, 2}))] * 4
    outputs = [[], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
    logits = torch.zeros(4, 5)
    process_logits(logits, params, [[0]] * 4, outputs)
    inf = float("-inf")
    assert logits.tolist() == [[0, inf, inf, 0, 0]] * 2 + [[0.0] * 5] * 2


def test_noop_batch_is_returned_untouched() -> None:
    logits = torch.randn(3, VOCAB)
    original = logits.clone()
    assert process_logits(logits, [NOOP] * 3, [[1]] * 3, [[2]] * 3) is logits
    assert torch.equal(logits, original)


def test_token_ids_outside_the_vocabulary_are_ignored() -> None:
    params = [
        LogitsParams(
            repetition_penalty=2.0,
            no_repeat_ngram_size=1,
            presence_penalty=1.0,
            bad_token_ids=frozenset({VOCAB + 3}),
            min_tokens=5,
            end_ids=frozenset({VOCAB}),
        )
    ]
    logits = torch.ones(1, VOCAB)
    process_logits(logits, params, [[VOCAB + 1]], [[VOCAB + 2, VOCAB + 2]])
    assert torch.equal(logits, torch.ones(1, VOCAB))


def test_no_values_read_back_from_the_device() -> None:
    """On the meta device any read of tensor values fails: the whole call must not need one."""
    params = [
        LogitsParams(
            repetition_penalty=1.2,
            presence_penalty=0.3,
            no_repeat_ngram_size=2,
            min_tokens=9,
            end_ids=frozenset({4}),
            bad_sequences=((1, 2),),
            embedding_bias=torch.zeros(VOCAB, device="meta"),
        ),
        NOOP,
        LogitsParams(frequency_penalty=0.5, no_repeat_ngram_size=3),
    ]
    logits = torch.empty(3, VOCAB, device="meta")
    out = process_logits(logits, params, [[1, 2, 1], [3], [1, 1, 1]], [[1, 2], [], [1, 1]])
    assert out.shape == (3, VOCAB) and out.device.type == "meta"


def test_input_checks() -> None:
    with pytest.raises(ValueError, match="float32"):
        process_logits(torch.zeros(1, 4, dtype=torch.float16), [NOOP], [[1]], [[]])
    with pytest.raises(ValueError, match="one params"):
        process_logits(torch.zeros(2, 4), [NOOP], [[1]], [[]])
    with pytest.raises(ValueError, match="embedding_bias of row 0 has 3 entries, need 4"):
        process_logits(
            torch.zeros(1, 4), [LogitsParams(embedding_bias=torch.zeros(3))], [[1]], [[]]
        )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"min_tokens": -2}, "min_tokens"),
        ({"bad_sequences": ((),)}, "bad_sequences"),
        ({"bad_sequences": ((1, -1),)}, "bad_sequences"),
        ({"embedding_bias": torch.zeros(2, 2)}, "embedding_bias"),
    ],
)
def test_logits_params_validation(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LogitsParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "noop"),
    [
        ({}, True),
        ({"min_tokens": 4}, True),
        ({"end_ids": frozenset({1})}, True),
        ({"min_tokens": 4, "end_ids": frozenset({1})}, False),
        ({"repetition_penalty": 1.1}, False),
        ({"presence_penalty": 0.1}, False),
        ({"frequency_penalty": -0.1}, False),
        ({"no_repeat_ngram_size": 2}, False),
        ({"bad_token_ids": frozenset({0})}, False),
        ({"bad_sequences": ((1, 2),)}, False),
        ({"embedding_bias": torch.zeros(3)}, False),
    ],
)
def test_is_noop(kwargs: dict[str, object], noop: bool) -> None:
    assert LogitsParams(**kwargs).is_noop is noop  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_apply_min_p_keeps_exactly_the_allowed_set(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(5, VOCAB, generator=generator) * 2, dim=-1)
    min_p = torch.tensor([0.0, 0.05, 0.3, 0.9, 1.0])
    out = apply_min_p(probs, min_p)
    assert torch.equal(out[0], probs[0])
    for row in range(5):
        top = max(probs[row].tolist())
        for token, (p, kept) in enumerate(zip(probs[row].tolist(), out[row].tolist(), strict=True)):
            assert kept == (p if p >= min_p[row].item() * top else 0.0), (row, token)
    assert (out[4] > 0).sum() == 1  # min_p = 1 keeps only the likeliest token


def test_apply_min_p_shape_check() -> None:
    with pytest.raises(ValueError, match="min_p"):
        apply_min_p(torch.ones(2, 3), torch.zeros(3))
