"""``rtllm bench``: parser and end-to-end runs on a tiny random Llama (dummy weights)."""

from __future__ import annotations

import argparse
import json

import pytest
import transformers

from rtllm.bench.cli import add_bench_parser

NUM_REQUESTS = 5
INPUT_LEN = 12
OUTPUT_LEN = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    return str(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtllm")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["bench", "throughput", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--load-format", "--dtype", "--dataset", "--input-len", "--output-len",
                   "--num-requests", "--input-len-std", "--output-len-std", "--concurrency",
                   "--max-batch-size", "--max-num-tokens", "--max-seq-len",
                   "--kv-cache-free-gpu-mem-fraction", "--tokens-per-block", "--warmup", "--report-json",
                   "--seed"):
        assert option in text
    args = _parser().parse_args(["bench", "latency", "--kv-cache-free-gpu-mem-fraction", "0.5"])
    assert args.kv_cache_free_gpu_memory_fraction == 0.5
    assert args.bench_mode == "latency" and not hasattr(args, "concurrency")
    default = _parser().parse_args(["bench", "throughput"])
    assert default.kv_cache_free_gpu_memory_fraction == 0.9 and default.concurrency is None


def _check_report(report: dict, mode: str, num_requests: int, output_len: int, input_len: int) -> None:
    assert report["metadata"]["mode"] == mode
    assert report["num_requests"] == num_requests  # warm-up requests excluded
    assert report["num_failed"] == 0
    assert report["total_output_tokens"] == num_requests * output_len
    assert report["total_input_tokens"] == num_requests * input_len
    assert report["duration_s"] > 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert report[key] > 0
    assert report["output_throughput"] == pytest.approx(report["total_output_tokens"] / report["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        assert report[key]["count"] == num_requests
        assert set(report[key]) == {"mean", "p50", "p90", "p99", "count"}
        assert 0 <= report[key]["p50"] <= report[key]["p90"] <= report[key]["p99"]
    assert report["itl_ms"]["count"] == num_requests * (output_len - 1)
    assert report["peak_gpu_memory_bytes"] is None  # CPU


def test_throughput_end_to_end(tiny_model, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = _run(["bench", "throughput", "--model", tiny_model, "--load-format", "dummy",
               "--num-requests", str(NUM_REQUESTS), "--input-len", str(INPUT_LEN),
               "--output-len", str(OUTPUT_LEN), "--warmup", "2", "--report-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    _check_report(report, "throughput", NUM_REQUESTS, OUTPUT_LEN, INPUT_LEN)
    assert report["metadata"]["concurrency"] == "unlimited"
    assert report["metadata"]["warmup"] == 2
    assert report["metadata"]["dataset"] == "synthetic"
    assert report["metadata"]["device"] == "cpu"
    text = capsys.readouterr().out
    assert "rtllm bench throughput" in text and "TTFT" in text


def test_latency_end_to_end_on_jsonl_dataset(tiny_model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(10, 10 + INPUT_LEN)), "output_tokens": OUTPUT_LEN})
                            + "\n" for _ in range(3)))
    out = tmp_path / "latency.json"
    rc = _run(["bench", "latency", "--model", f"{tiny_model}/config.json", "--load-format", "dummy",
               "--dataset", str(data), "--warmup", "1", "--report-json", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    _check_report(report, "latency", 3, OUTPUT_LEN, INPUT_LEN)
    assert report["metadata"]["concurrency"] == 1
    assert "rtllm bench latency" in capsys.readouterr().out


def test_throughput_with_concurrency_and_length_spread(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    rc = _run(["bench", "throughput", "--model", tiny_model, "--load-format", "dummy",
               "--num-requests", "4", "--input-len", "8", "--input-len-std", "3",
               "--output-len", "3", "--output-len-std", "1", "--concurrency", "2",
               "--warmup", "0", "--seed", "5", "--max-batch-size", "8", "--tokens-per-block", "16",
               "--report-json", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    stats = report["metadata"]["dataset_stats"]
    assert report["num_requests"] == 4 and report["metadata"]["concurrency"] == 2
    assert report["total_output_tokens"] == round(stats["mean_output_len"] * 4)
    assert report["total_input_tokens"] == round(stats["mean_input_len"] * 4)


def test_bad_dataset_fails_before_loading_the_model(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input_ids": [1], "output_tokens": 2}\n{"input_ids": "x", "output_tokens": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
        _run(["bench", "throughput", "--model", "/nonexistent", "--dataset", str(data)])
    with pytest.raises(ValueError, match="--num-requests"):
        _run(["bench", "latency", "--model", "/nonexistent", "--num-requests", "0"])


def test_throughput_with_tensor_parallel_workers(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    rc = _run(["bench", "throughput", "--model", tiny_model, "--load-format", "dummy", "--tp", "2",
               "--num-requests", "4", "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
               "--warmup", "0", "--report-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    _check_report(report, "throughput", 4, OUTPUT_LEN, INPUT_LEN)
    assert report["metadata"]["tensor_parallel_size"] == 2
