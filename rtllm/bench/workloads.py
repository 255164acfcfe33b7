"""Synthetic workloads for prefix reuse and chunked context.

Shared system prompt (``--shared-prefix-len N --num-prefixes K``)
    Every prompt is one of K random prefixes of N tokens followed by the
    request's own random suffix of ``--input-len`` tokens (the suffixes are the
    plain synthetic dataset of the same seed). Request ``i`` takes prefix
    ``i % K`` (round-robin). Warm-up requests (:func:`warmup_dataset`) carry the
    same prefixes with suffixes of their own, so ``--warmup >= K`` leaves every
    prefix cached before the measured run (a server's steady state) without
    caching any measured prompt as a whole.

Multi-turn conversations (``--num-turns T``)
    :func:`multi_turn_dataset` draws each conversation's first prompt (as above)
    and the new user tokens of its later turns. The prompt of turn ``t + 1`` is
    the prompt of turn ``t``, the tokens turn ``t`` actually generated and the
    new user tokens (:meth:`Conversation.turn_request`), so a later turn can reuse
    the KV of the whole previous turn.

Long prompt (``--long-prompt-len L``)
    :func:`random_request` draws the long request: L random tokens unrelated to
    every other prompt.

Every builder is deterministic in its ``seed``; token ids are uniform over the
vocabulary minus ``exclude_ids`` (special tokens), as in
:func:`rtllm.bench.dataset.synthetic_dataset`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rtllm.bench.dataset import BenchRequest, synthetic_dataset

# Offset of the seed of the warm-up suffixes, so that they differ from the measured ones.
_WARMUP_SEED_OFFSET = 2**32


class TokenSampler:
    """Draws random token ids from ``[0, vocab_size)`` minus ``exclude_ids``."""

    def __init__(self, vocab_size: int, exclude_ids: Iterable[int] = ()) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        excluded = {t for t in exclude_ids if 0 <= t < vocab_size}
        self.vocab_size = vocab_size
        self.allowed = [t for t in range(vocab_size) if t not in excluded] if excluded else None
        if self.allowed is not None and not self.allowed:
            raise ValueError("every token id of the vocabulary is excluded")

    def draw(self, rng: random.Random, count: int) -> tuple[int, ...]:
        """``count`` token ids drawn with ``rng``."""
        if self.allowed is None:
            return tuple(rng.randrange(self.vocab_size) for _ in range(count))
        allowed = self.allowed
        return tuple(allowed[rng.randrange(len(allowed))] for _ in range(count))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def shared_prefixes(
    shared_prefix_len: int,
    num_prefixes: int,
    vocab_size: int,
    *,
    seed: int = 0,
    exclude_ids: Iterable[int] = (),
) -> list[tuple[int, ...]]:
    """The ``num_prefixes`` random prefixes of ``shared_prefix_len`` tokens of a seed."""
    _check_positive(shared_prefix_len=shared_prefix_len, num_prefixes=num_prefixes)
    sampler = TokenSampler(vocab_size, exclude_ids)
    rng = random.Random(f"rtllm-bench-shared-prefix:{seed}")
    return [sampler.draw(rng, shared_prefix_len) for _ in range(num_prefixes)]


def shared_prefix_dataset(
    num_requests: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    *,
    shared_prefix_len: int = 0,
    num_prefixes: int = 1,
    input_len_std: float = 0.0,
    output_len_std: float = 0.0,
    seed: int = 0,
    exclude_ids: Iterable[int] = (),
) -> list[BenchRequest]:
    """Synthetic requests whose prompts start with one of ``num_prefixes`` shared prefixes.

    The suffixes (``input_len`` tokens, optionally normal-distributed) and output
    lengths are exactly :func:`~rtllm.bench.dataset.synthetic_dataset`'s for the same
    arguments; request ``i`` is prefixed with prefix ``i % num_prefixes``. With
    ``shared_prefix_len=0`` this is the plain synthetic dataset.
    """
    exclude = list(exclude_ids)
    requests = synthetic_dataset(
        num_requests,
        input_len,
        output_len,
        vocab_size,
        input_len_std=input_len_std,
        output_len_std=output_len_std,
        seed=seed,
        exclude_ids=exclude,
    )
    if not shared_prefix_len:
        return requests
    return _with_prefixes(
        requests,
        shared_prefixes(
            shared_prefix_len, num_prefixes, vocab_size, seed=seed, exclude_ids=exclude
        ),
    )


def warmup_dataset(
    count: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    *,
    shared_prefix_len: int = 0,
    num_prefixes: int = 1,
    seed: int = 0,
    exclude_ids: Iterable[int] = (),
) -> list[BenchRequest]:
    """Warm-up requests shaped like the measured ones, with suffixes of their own.

    They carry the same shared prefixes as :func:`shared_prefix_dataset` of the
    same ``seed`` (round-robin) but suffixes drawn from another seed, so they
    cache the prefixes and nothing else of the measured prompts. Empty when
    ``count`` is 0.
    """
    if count <= 0:
        return []
    exclude = list(exclude_ids)
    requests = synthetic_dataset(
        count,
        input_len,
        output_len,
        vocab_size,
        seed=seed + _WARMUP_SEED_OFFSET,
        exclude_ids=exclude,
    )
    if not shared_prefix_len:
        return requests
    return _with_prefixes(
        requests,
        shared_prefixes(
            shared_prefix_len, num_prefixes, vocab_size, seed=seed, exclude_ids=exclude
        ),
    )


def _with_prefixes(
    requests: list[BenchRequest], prefixes: list[tuple[int, ...]]
) -> list[BenchRequest]:
    """Prefix request ``i`` with ``prefixes[i % len(prefixes)]`` (round-robin)."""
    return [
        BenchRequest(
            output_tokens=r.output_tokens,
            input_ids=prefixes[i % len(prefixes)] + (r.input_ids or ()),
        )
        for i, r in enumerate(requests)
    ]


def random_request(
    prompt_len: int,
    output_len: int,
    vocab_size: int,
    *,
    seed: int = 0,
    tag: str = "long-prompt",
    exclude_ids: Iterable[int] = (),
) -> BenchRequest:
    """One request of ``prompt_len`` random tokens, drawn from a stream of its own.

    Different ``tag``s (e.g. the measured long prompt and its warm-up) give
    unrelated prompts, so neither can reuse the other's KV.
    """
    _check_positive(prompt_len=prompt_len, output_len=output_len)
    rng = random.Random(f"rtllm-bench-{tag}:{seed}")
    ids = TokenSampler(vocab_size, exclude_ids).draw(rng, prompt_len)
    return BenchRequest(output_tokens=output_len, input_ids=ids)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A multi-turn conversation of random tokens.

    Attributes:
        user_turns: Tokens each turn adds: turn 0's is the whole first prompt,
            a later turn's the new user tokens appended after the previous turn's
            prompt and generated tokens.
        output_tokens: Tokens generated by each turn.
    """

    user_turns: tuple[tuple[int, ...], ...]
    output_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.user_turns or len(self.user_turns) != len(self.output_tokens):
            raise ValueError(
                "a conversation needs one output length per turn, and at least one turn"
            )

    @property
    def num_turns(self) -> int:
        """Turns of the conversation."""
        return len(self.user_turns)

    @property
    def last_prompt_len(self) -> int:
        """Prompt length of the last turn (every earlier turn generating its full output)."""
        return sum(len(t) for t in self.user_turns) + sum(self.output_tokens[:-1])

    def turn_request(
        self, turn: int, previous_prompt: Sequence[int] = (), generated: Sequence[int] = ()
    ) -> BenchRequest:
        """The request of ``turn``: previous prompt + its generated tokens + new user tokens.

        ``previous_prompt`` and ``generated`` are ignored (and should be empty) for turn 0.
        """
        if not 0 <= turn < self.num_turns:
            raise ValueError(f"turn must be in [0, {self.num_turns}), got {turn}")
        if turn == 0:
            ids = self.user_turns[0]
        else:
            if not previous_prompt:
                raise ValueError(f"turn {turn} needs the prompt of turn {turn - 1}")
            ids = tuple(previous_prompt) + tuple(generated) + self.user_turns[turn]
        return BenchRequest(output_tokens=self.output_tokens[turn], input_ids=ids)


def multi_turn_dataset(
    num_conversations: int,
    num_turns: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    *,
    shared_prefix_len: int = 0,
    num_prefixes: int = 1,
    input_len_std: float = 0.0,
    output_len_std: float = 0.0,
    seed: int = 0,
    exclude_ids: Iterable[int] = (),
) -> list[Conversation]:
    """``num_conversations`` conversations of ``num_turns`` turns.

    First prompts are :func:`shared_prefix_dataset`'s for the same arguments; every
    later turn adds ``input_len`` new random tokens (optionally normal-distributed,
    like every output length) drawn from a stream of its own.
    """
    _check_positive(num_turns=num_turns)
    exclude = list(exclude_ids)
    first = shared_prefix_dataset(
        num_conversations,
        input_len,
        output_len,
        vocab_size,
        shared_prefix_len=shared_prefix_len,
        num_prefixes=num_prefixes,
        input_len_std=input_len_std,
        output_len_std=output_len_std,
        seed=seed,
        exclude_ids=exclude,
    )
    sampler = TokenSampler(vocab_size, exclude)
    rng = random.Random(f"rtllm-bench-turns:{seed}")

    def length(mean: int, std: float) -> int:
        return mean if std <= 0 else max(1, round(rng.gauss(mean, std)))

    conversations = []
    for request in first:
        user_turns = [request.input_ids or ()]
        outputs = [request.output_tokens]
        for _ in range(num_turns - 1):
            user_turns.append(sampler.draw(rng, length(input_len, input_len_std)))
            outputs.append(length(output_len, output_len_std))
        conversations.append(Conversation(tuple(user_turns), tuple(outputs)))
    return conversations
