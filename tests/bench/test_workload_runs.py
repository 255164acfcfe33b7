"""``rtllm bench`` workloads end to end on a tiny random Llama (CPU): shared prefixes,
multi-turn conversations, a long prompt among running streams. No timing is asserted."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig
from rtllm.bench.multi_turn import run_conversations_async
from rtllm.bench.workloads import multi_turn_dataset
from rtllm.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("workload_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _bench(model_dir: str, tmp_path, mode: str, *options: str) -> dict:
    out = tmp_path / "report.json"
    rc = main(
        [
            "bench",
            mode,
            "--model",
            model_dir,
            "--tokens-per-block",
            "8",
            "--no-progress",
            "--report-json",
            str(out),
            *options,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("mode", "reuse"), [("throughput", True), ("throughput", False), ("latency", True)]
)
def test_shared_prefix_reuse_counters(model_dir, tmp_path, capsys, mode, reuse):
    report = _bench(
        model_dir,
        tmp_path,
        mode,
        "--num-requests",
        "5",
        "--input-len",
        "6",
        "--output-len",
        "3",
        "--shared-prefix-len",
        "32",
        "--num-prefixes",
        "2",
        "--warmup",
        "2",
        "--enable-block-reuse" if reuse else "--no-enable-block-reuse",
    )
    assert report["num_requests"] == 5 and report["num_failed"] == 0
    assert report["total_input_tokens"] == 5 * 38
    assert report["metadata"]["workload"] == "shared-prefix"
    assert report["shared_prefix"] == {
        "shared_prefix_len": 32,
        "num_prefixes": 2,
        "assignment": "round-robin",
        "prefixes_cached_by_warmup": 2,
    }
    kv = report["kv_cache"]
    assert kv["enable_block_reuse"] is reuse
    if reuse:
        assert kv["reused_blocks"] > 0 and 0 < kv["cache_hit_rate"] <= 1
        assert (
            kv["reused_blocks"] == 5 * 4
        )  # every measured request: its 4 prefix blocks, cached at warm-up
    else:
        assert kv["reused_blocks"] == 0 and kv["cache_hit_rate"] == 0
    for key in ("missed_blocks", "onloaded_blocks", "offloaded_blocks"):
        assert kv[key] >= 0
    text = capsys.readouterr().out
    assert "kv cache" in text and "reused_blocks" in text and "shared prefix" in text


def test_plain_run_reports_kv_cache_too(model_dir, tmp_path):
    report = _bench(
        model_dir,
        tmp_path,
        "throughput",
        "--num-requests",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "2",
        "--warmup",
        "0",
    )
    assert "workload" not in report["metadata"]
    assert report["kv_cache"]["scope"].startswith("measured run")
    assert (
        "multi_turn" not in report and "long_prompt" not in report and "shared_prefix" not in report
    )


@pytest.mark.parametrize("reuse", [True, False])
def test_multi_turn_report(model_dir, tmp_path, capsys, reuse):
    report = _bench(
        model_dir,
        tmp_path,
        "throughput",
        "--num-requests",
        "3",
        "--num-turns",
        "3",
        "--input-len",
        "10",
        "--output-len",
        "6",
        "--concurrency",
        "2",
        "--warmup",
        "1",
        "--enable-block-reuse" if reuse else "--no-enable-block-reuse",
    )
    assert report["num_requests"] == 9 and report["num_failed"] == 0  # every turn is a request
    assert report["total_output_tokens"] == 9 * 6
    assert report["metadata"]["workload"] == "multi-turn" and report["metadata"]["concurrency"] == 2
    mt = report["multi_turn"]
    assert mt["num_conversations"] == 3 and mt["num_turns"] == 3
    assert mt["turns_completed"] == 9 and mt["turns_skipped"] == 0
    assert mt["mean_input_len_by_turn"] == [
        10,
        26,
        42,
    ]  # + the 6 generated and 10 new tokens per turn
    assert report["total_input_tokens"] == 3 * (10 + 26 + 42)
    assert mt["ttft_first_turn_ms"]["count"] == 3 and mt["ttft_later_turns_ms"]["count"] == 6
    assert len(mt["ttft_mean_by_turn_ms"]) == 3
    kv = report["kv_cache"]
    # Turn 2 reuses turn 1's (10 + 5 computed tokens) 1 full block, turn 3 reuses 3.
    assert kv["reused_blocks"] == (3 * (1 + 3) if reuse else 0)
    text = capsys.readouterr().out
    assert "multi turn" in text and "ttft_first_turn" in text and "ttft_later_turns" in text


class _Spy:
    """Records every prompt submitted to the LLM and its result."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.calls: list[tuple[list[int], object]] = []

    def generate_async(self, inputs, params, streaming=False):
        result = self.llm.generate_async(inputs, params, streaming=streaming)
        self.calls.append((list(inputs), result))
        return result


def test_each_turn_extends_the_previous_prompt_and_its_real_output(model_dir):
    conversations = multi_turn_dataset(2, 3, 5, 4, 256, shared_prefix_len=8, seed=3)
    with LLM(
        model_dir, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(tokens_per_block=4)
    ) as llm:
        spy = _Spy(llm)
        run = asyncio.run(run_conversations_async(spy, conversations, concurrency=None))
        assert not run.errors and len(run.turns) == 6
        assert llm.executor.engine.kv_cache.counters.reused_blocks > 0
    by_prefix: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
    for prompt, result in spy.calls:
        by_prefix[tuple(prompt)] = (prompt, list(result.outputs[0].token_ids))
    for conversation in conversations:
        prompt = list(conversation.user_turns[0])
        for turn in range(1, 3):
            _, generated = by_prefix[tuple(prompt)]
            assert len(generated) == 4
            prompt = prompt + generated + list(conversation.user_turns[turn])
            assert tuple(prompt) in by_prefix  # turn t+1 was submitted with exactly this prompt


@pytest.mark.parametrize("chunked", [False, True])
def test_long_prompt_report(model_dir, tmp_path, capsys, chunked):
    engine = (
        ["--enable-chunked-prefill", "--max-num-tokens", "32"]
        if chunked
        else ["--max-num-tokens", "256"]
    )
    report = _bench(
        model_dir,
        tmp_path,
        "throughput",
        "--num-requests",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "40",
        "--long-prompt-len",
        "160",
        "--long-prompt-after-tokens",
        "4",
        "--warmup",
        "1",
        *engine,
    )
    assert report["num_requests"] == 4 and report["num_failed"] == 0  # the normal streams only
    assert report["metadata"]["workload"] == "long-prompt"
    lp = report["long_prompt"]
    assert (
        lp["long_prompt_len"] == 160
        and lp["long_prompt_after_tokens"] == 4
        and lp["num_streams"] == 4
    )
    assert lp["enable_chunked_prefill"] is chunked
    assert lp["streams_running_at_submit"] == 4
    assert lp["long_ttft_ms"] > 0 and lp["long_e2e_latency_ms"] >= lp["long_ttft_ms"]
    window = lp["window_itl_ms"]
    assert window is not None and window["count"] >= 1
    assert set(window) == {"mean", "p50", "p90", "p99", "max", "count"}
    assert window["p50"] <= window["max"]
    assert lp["baseline_itl_ms"]["count"] >= 4 * 3  # >= 4 tokens per stream before the submission
    assert "window_itl" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["latency", "--num-turns", "2"], "--num-turns runs only with `rtllm bench throughput`"),
        (["latency", "--long-prompt-len", "8"], "--long-prompt-len runs only with"),
        (
            ["throughput", "--num-turns", "2", "--dataset", "x.jsonl"],
            "--num-turns builds a synthetic dataset",
        ),
        (
            ["throughput", "--shared-prefix-len", "4", "--dataset", "x.jsonl"],
            "--shared-prefix-len builds",
        ),
        (["throughput", "--num-turns", "0"], "argument --num-turns: must be a positive integer"),
        (
            ["throughput", "--shared-prefix-len", "-3"],
            "argument --shared-prefix-len: must be a positive",
        ),
        (["latency", "--num-prefixes", "x"], "argument --num-prefixes: must be a positive integer"),
        (["throughput", "--num-prefixes", "2"], "--num-prefixes needs --shared-prefix-len"),
        (
            ["throughput", "--long-prompt-after-tokens", "2"],
            "--long-prompt-after-tokens needs --long-prompt-len",
        ),
        (["throughput", "--num-turns", "2", "--long-prompt-len", "8"], "separate workloads"),
        (
            ["throughput", "--long-prompt-len", "8", "--concurrency", "2"],
            "cannot be used with --concurrency",
        ),
        (
            ["throughput", "--long-prompt-len", "8", "--output-len", "8"],
            "must be smaller than --output-len",
        ),
        (
            ["throughput", "--long-prompt-len", "100", "--max-num-tokens", "64"],
            "--max-num-tokens must be >= 132",
        ),
        (
            ["throughput", "--long-prompt-len", "8", "--max-batch-size", "32"],
            "--max-batch-size >= 33",
        ),
    ],
)
def test_bad_workload_options_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv, "--model", "/nonexistent"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_too_long_conversation_is_refused_with_the_option_named(model_dir, capsys):
    rc = main(
        [
            "bench",
            "throughput",
            "--model",
            model_dir,
            "--num-requests",
            "2",
            "--num-turns",
            "9",
            "--input-len",
            "16",
            "--output-len",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "--num-turns 9" in err and "max_seq_len=256" in err


def test_help_documents_the_workloads(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--shared-prefix-len",
        "--num-prefixes",
        "--num-turns",
        "--long-prompt-len",
        "--long-prompt-after-tokens",
        "--enable-block-reuse",
        "--enable-chunked-prefill",
    ):
        assert option in text
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--help"])
    text = capsys.readouterr().out
    assert (
        "--shared-prefix-len" in text
        and "--num-turns" not in text
        and "--long-prompt-len" not in text
    )
