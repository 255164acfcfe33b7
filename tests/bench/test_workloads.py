"""Workload builders (shared prefixes, multi-turn conversations, long prompt) and their metrics."""

from __future__ import annotations

import pytest

from rtllm.bench.dataset import synthetic_dataset
from rtllm.bench.long_prompt import check_long_prompt_budget, window_gaps
from rtllm.bench.metrics import (
    format_section,
    kv_cache_section,
    read_kv_cache_counters,
    summarize_ms,
)
from rtllm.bench.workloads import (
    Conversation,
    multi_turn_dataset,
    random_request,
    shared_prefix_dataset,
    shared_prefixes,
    warmup_dataset,
)

VOCAB = 100
EXCLUDE = [0, 1, 99]


def test_shared_prefix_dataset_round_robin_over_prefixes():
    reqs = shared_prefix_dataset(
        7, 5, 3, VOCAB, shared_prefix_len=12, num_prefixes=3, seed=4, exclude_ids=EXCLUDE
    )
    prefixes = shared_prefixes(12, 3, VOCAB, seed=4, exclude_ids=EXCLUDE)
    plain = synthetic_dataset(7, 5, 3, VOCAB, seed=4, exclude_ids=EXCLUDE)
    assert len(set(prefixes)) == 3 and all(len(p) == 12 for p in prefixes)
    for i, (req, suffix) in enumerate(zip(reqs, plain, strict=True)):
        assert req.input_ids == prefixes[i % 3] + suffix.input_ids  # prefix, then the plain suffix
        assert req.output_tokens == 3
        assert all(2 <= t <= 98 for t in req.input_ids)
    assert (
        shared_prefix_dataset(
            7, 5, 3, VOCAB, shared_prefix_len=12, num_prefixes=3, seed=4, exclude_ids=EXCLUDE
        )
        == reqs
    )
    assert shared_prefix_dataset(7, 5, 3, VOCAB, seed=4, exclude_ids=EXCLUDE) == plain  # no prefix


def test_warmup_shares_the_prefixes_but_not_the_suffixes():
    measured = shared_prefix_dataset(4, 6, 2, VOCAB, shared_prefix_len=8, num_prefixes=2, seed=1)
    warm = warmup_dataset(3, 6, 2, VOCAB, shared_prefix_len=8, num_prefixes=2, seed=1)
    assert len(warm) == 3
    assert [w.input_ids[:8] for w in warm] == [measured[i % 2].input_ids[:8] for i in range(3)]
    measured_suffixes = {m.input_ids[8:] for m in measured}
    assert all(w.input_ids[8:] not in measured_suffixes for w in warm)
    assert warmup_dataset(0, 6, 2, VOCAB, shared_prefix_len=8) == []
    plain_warm = warmup_dataset(2, 6, 2, VOCAB, seed=1)
    assert all(len(w.input_ids) == 6 for w in plain_warm)
    assert plain_warm != synthetic_dataset(2, 6, 2, VOCAB, seed=1)


def test_random_request_tags_give_unrelated_prompts():
    a = random_request(50, 4, VOCAB, seed=0)
    assert len(a.input_ids) == 50 and a.output_tokens == 4
    assert random_request(50, 4, VOCAB, seed=0) == a
    assert random_request(50, 4, VOCAB, seed=0, tag="long-prompt-warmup").input_ids != a.input_ids
    with pytest.raises(ValueError, match="prompt_len"):
        random_request(0, 4, VOCAB)


def test_multi_turn_prompts_extend_the_previous_turn():
    conversations = multi_turn_dataset(
        3, 4, 5, 3, VOCAB, shared_prefix_len=6, num_prefixes=1, seed=2, exclude_ids=EXCLUDE
    )
    first = shared_prefix_dataset(3, 5, 3, VOCAB, shared_prefix_len=6, seed=2, exclude_ids=EXCLUDE)
    assert [c.turn_request(0) for c in conversations] == first
    for n, conversation in enumerate(conversations):
        assert conversation.num_turns == 4
        prompt: tuple[int, ...] = ()
        generated: list[int] = []
        for turn in range(4):
            request = conversation.turn_request(turn, prompt, generated)
            assert request.output_tokens == 3
            if turn:
                # The whole previous prompt, then what it generated, then 5 new tokens.
                assert request.input_ids[: len(prompt)] == prompt
                assert (
                    list(request.input_ids[len(prompt) : len(prompt) + len(generated)]) == generated
                )
                assert (
                    request.input_ids[len(prompt) + len(generated) :]
                    == conversation.user_turns[turn]
                )
                assert len(conversation.user_turns[turn]) == 5
            prompt = request.input_ids
            generated = [10 + n, 20 + turn, 30]  # stand-ins for the tokens the turn produced
        assert len(prompt) == conversation.last_prompt_len
    assert (
        multi_turn_dataset(3, 4, 5, 3, VOCAB, shared_prefix_len=6, seed=2, exclude_ids=EXCLUDE)
        == conversations
    )
    with pytest.raises(ValueError, match="prompt of turn 0"):
        conversations[0].turn_request(1)
    with pytest.raises(ValueError, match="turn must be"):
        conversations[0].turn_request(4, (1,), ())
    with pytest.raises(ValueError, match="num_turns"):
        multi_turn_dataset(1, 0, 5, 3, VOCAB)
    with pytest.raises(ValueError, match="output length per turn"):
        Conversation(((1,), (2,)), (3,))


def test_window_gaps_cover_submit_to_first_token():
    times = [0.0, 1.0, 2.0, 7.0, 8.0, 9.0]
    # Submitted at 2.5, long first token at 7.0: the stalled gap 2 -> 7 (its token is at `end`).
    assert window_gaps(times, 2.5, 7.0) == [5.0]
    # Long first token recorded just after the stream's token of the same step: one more gap.
    assert window_gaps(times, 2.5, 7.01) == [5.0, 1.0]
    assert window_gaps(times, 9.5, 10.0) == []  # the stream had ended
    assert window_gaps([], 0.0, 1.0) == []


def test_long_prompt_budget_message_names_the_options():
    check_long_prompt_budget(100, 4, 104, enable_chunked_prefill=False)
    check_long_prompt_budget(1000, 4, 16, enable_chunked_prefill=True)
    with pytest.raises(ValueError) as exc:
        check_long_prompt_budget(100, 4, 64, enable_chunked_prefill=False)
    for text in ("--max-num-tokens", "--long-prompt-len 100", ">= 104", "--enable-chunked-prefill"):
        assert text in str(exc.value)


class _Counters:
    reused_blocks = 7
    missed_blocks = 3
    onloaded_blocks = 1

    @property
    def cache_hit_rate(self) -> float:
        return 0.7


class _FakeLLM:
    def __init__(self, counters: object) -> None:
        kv_cache = type(
            "KV", (), {"counters": counters, "enable_block_reuse": True, "tokens_per_block": 8}
        )
        engine = type("Engine", (), {"kv_cache": kv_cache})
        self.executor = type("Executor", (), {"engine": engine})


def test_kv_cache_section_is_a_delta_and_guards_missing_attributes():
    llm = _FakeLLM(_Counters())
    after = read_kv_cache_counters(llm)
    assert after == {
        "reused_blocks": 7,
        "missed_blocks": 3,
        "onloaded_blocks": 1,
    }  # no offloaded_blocks
    section = kv_cache_section({"reused_blocks": 2, "missed_blocks": 3}, after, llm)
    assert section["reused_blocks"] == 5 and section["missed_blocks"] == 0
    assert section["cache_hit_rate"] == 1.0 and section["cache_hit_rate_since_start"] == 0.7
    assert section["enable_block_reuse"] is True and section["tokens_per_block"] == 8
    assert "offloaded_blocks" not in section
    assert read_kv_cache_counters(object()) is None
    assert read_kv_cache_counters(_FakeLLM(object())) is None
    assert kv_cache_section(None, None) is None


def test_format_section_and_summaries():
    assert summarize_ms([]) is None
    stats = summarize_ms([0.001, 0.003, 0.002])
    assert (
        stats["max"] == pytest.approx(3.0)
        and stats["count"] == 3
        and stats["mean"] == pytest.approx(2.0)
    )
    lines = format_section(
        "long_prompt",
        {"num_streams": 4, "window_itl_ms": stats, "baseline_itl_ms": None, "by_turn": [1.5, None]},
    )
    text = "\n".join(lines)
    assert "long prompt" in text and "num_streams" in text and "1.50, n/a" in text
    assert "window_itl" in text and "(n=3)" in text and "baseline_itl" in text
    assert format_section("kv_cache", None)[-1].strip() == "n/a"
