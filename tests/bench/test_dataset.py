"""Benchmark datasets: synthetic generation and JSON-lines parsing."""

from __future__ import annotations

import json

import pytest

from rtllm.bench.dataset import (
    BenchRequest,
    dataset_stats,
    load_jsonl_dataset,
    synthetic_dataset,
)


def test_synthetic_shapes_and_vocab():
    reqs = synthetic_dataset(10, 7, 5, vocab_size=50, seed=3, exclude_ids=[0, 1, 2, 49])
    assert len(reqs) == 10
    for r in reqs:
        assert r.prompt is None
        assert len(r.input_ids) == 7
        assert r.output_tokens == 5
        assert all(3 <= t <= 48 for t in r.input_ids)
    params = reqs[0].sampling_params()
    assert params.max_tokens == 5 and params.ignore_eos
    assert reqs[0].inputs == list(reqs[0].input_ids)


def test_synthetic_is_deterministic_per_seed():
    a = synthetic_dataset(4, 16, 8, vocab_size=1000, seed=7)
    b = synthetic_dataset(4, 16, 8, vocab_size=1000, seed=7)
    c = synthetic_dataset(4, 16, 8, vocab_size=1000, seed=8)
    assert a == b
    assert a != c


def test_synthetic_normal_lengths_are_clipped_to_one():
    reqs = synthetic_dataset(200, 3, 2, vocab_size=100, input_len_std=5.0, output_len_std=5.0, seed=0)
    in_lens = [len(r.input_ids) for r in reqs]
    out_lens = [r.output_tokens for r in reqs]
    assert min(in_lens) == 1 and min(out_lens) == 1  # clipped, and often hit with std >> mean
    assert len(set(in_lens)) > 3 and len(set(out_lens)) > 3
    assert synthetic_dataset(200, 3, 2, vocab_size=100, input_len_std=5.0, output_len_std=5.0, seed=0) == reqs


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="input_len"):
        synthetic_dataset(1, 0, 1, vocab_size=10)
    with pytest.raises(ValueError, match="num_requests"):
        synthetic_dataset(0, 1, 1, vocab_size=10)
    with pytest.raises(ValueError, match="std"):
        synthetic_dataset(1, 1, 1, vocab_size=10, input_len_std=-1)
    with pytest.raises(ValueError, match="excluded"):
        synthetic_dataset(1, 1, 1, vocab_size=2, exclude_ids=[0, 1])


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_parsing(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"prompt": "hello", "output_tokens": 3, "task_id": 1}),
        "",
        json.dumps({"input_ids": [1, 2, 3], "max_tokens": 4}),
        json.dumps({"input_ids": [5]}),
    ])
    reqs = load_jsonl_dataset(path, default_output_tokens=9)
    assert reqs == [
        BenchRequest(output_tokens=3, prompt="hello"),
        BenchRequest(output_tokens=4, input_ids=(1, 2, 3)),
        BenchRequest(output_tokens=9, input_ids=(5,)),
    ]
    assert load_jsonl_dataset(path, default_output_tokens=9, num_requests=2) == reqs[:2]
    stats = dataset_stats(reqs)
    assert stats["num_requests"] == 3 and stats["num_text_prompts"] == 1
    assert stats["mean_input_len"] == 2.0 and stats["max_output_len"] == 9


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"output_tokens": 2}', "exactly one of 'prompt' and 'input_ids'"),
        ('{"prompt": "a", "input_ids": [1], "output_tokens": 2}', "exactly one of"),
        ('{"prompt": "", "output_tokens": 2}', "'prompt' must be a non-empty string"),
        ('{"input_ids": [], "output_tokens": 2}', "'input_ids' must be a non-empty list"),
        ('{"input_ids": [1, -2], "output_tokens": 2}', "'input_ids' must be"),
        ('{"input_ids": [1], "output_tokens": 0}', "'output_tokens' must be a positive integer"),
        ('{"input_ids": [1]}', "no 'output_tokens'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"input_ids": [1], "output_tokens": 1}), "", line])
    with pytest.raises(ValueError) as exc:
        load_jsonl_dataset(path)
    assert f"{path}:3:" in str(exc.value)
    assert message in str(exc.value)


def test_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="no requests"):
        load_jsonl_dataset(_write(tmp_path, ["", "  "]))
