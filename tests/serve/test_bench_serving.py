"""``rtllm bench serve`` against the real server (uvicorn on 127.0.0.1) and a bare fake one."""

from __future__ import annotations

import argparse
import json
import math
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_helpers import SERVED_NAME, LiveServer

from rtllm import LLM
from rtllm.bench.serving import (
    add_serving_parser,
    arrival_gaps,
    load_dataset,
    run_bench_serve,
    synthetic_prompts,
)
from rtllm.serve import build_app

STAT_KEYS = {"mean", "p50", "p90", "p99"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rtllm bench")
    add_serving_parser(parser.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(["serve", *argv])


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[LiveServer]:
    with LiveServer(build_app(llm, SERVED_NAME)) as live:
        yield live


def test_bench_serve_against_rtllm(server: LiveServer, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "report.json"
    args = parse("--base-url", server.base_url, "--num-requests", "8", "--request-rate", "40",
                 "--max-concurrency", "3", "--input-len", "12", "--output-len", "9", "--ignore-eos",
                 "--report-json", str(report_path))
    assert args.func is run_bench_serve
    assert run_bench_serve(args) == 0
    report = json.loads(report_path.read_text())
    assert report["model"] == SERVED_NAME
    assert report["completed"] == 8 and report["failed"] == 0
    assert report["total_output_tokens"] == 8 * 9
    assert report["total_input_tokens"] > 8 * 12  # usage: words plus BOS, split into sub-words
    assert report["max_concurrency"] == 3 and report["request_rate"] == 40
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(report[key]) == STAT_KEYS
        assert 0 < report[key]["p50"] <= report[key]["p99"]
    assert report["request_throughput"] > 0 and report["output_throughput"] > report["request_throughput"]
    out = capsys.readouterr().out
    for title in ("Serving Benchmark Result", "Request throughput", "Output token throughput",
                  "P99 TTFT (ms)", "Mean TPOT (ms)", "P90 ITL (ms)", "P50 E2EL (ms)"):
        assert title in out


def test_bench_serve_dataset_and_chat(server: LiveServer, tmp_path: Any) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Hello there"}\n\n{"prompt": "Once upon a time"}\n', encoding="utf-8")
    report_path = tmp_path / "chat.json"
    args = parse("--base-url", server.base_url, "--endpoint", "/v1/chat/completions", "--model", SERVED_NAME,
                 "--dataset", str(dataset), "--num-requests", "4", "--output-len", "5", "--ignore-eos",
                 "--report-json", str(report_path))
    assert run_bench_serve(args) == 0
    report = json.loads(report_path.read_text())
    assert report["completed"] == 4 and report["total_output_tokens"] == 20 and report["request_rate"] == "inf"


def test_bench_serve_reports_failures(server: LiveServer, tmp_path: Any) -> None:
    report_path = tmp_path / "bad.json"
    args = parse("--base-url", server.base_url, "--model", "no-such-model", "--num-requests", "2",
                 "--output-len", "4", "--report-json", str(report_path))
    assert run_bench_serve(args) == 1
    report = json.loads(report_path.read_text())
    assert report["failed"] == 2 and "HTTP 400" in report["errors"][0]


def _bare_server() -> httpx.ASGITransport:
    """An OpenAI-compatible server that streams 3 text chunks and never sends usage."""
    from fastapi import FastAPI
    from starlette.responses import StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "bare", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def events() -> Any:
            for text in ("a", "", "b", "c"):
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return httpx.ASGITransport(app=app)


def test_bench_serve_counts_chunks_without_usage(tmp_path: Any) -> None:
    report_path = tmp_path / "bare.json"
    args = parse("--base-url", "http://bare", "--num-requests", "5", "--request-rate", "1000",
                 "--no-stream-usage", "--report-json", str(report_path))
    assert run_bench_serve(args, transport=_bare_server()) == 0
    report = json.loads(report_path.read_text())
    assert report["model"] == "bare" and report["completed"] == 5
    assert report["total_output_tokens"] == 15 and report["total_input_tokens"] == 0


def test_arrivals_prompts_and_dataset_are_seeded(tmp_path: Any) -> None:
    assert arrival_gaps(4, math.inf, 0) == [0.0] * 4
    gaps = arrival_gaps(2000, 10.0, 1)
    assert gaps == arrival_gaps(2000, 10.0, 1) and gaps != arrival_gaps(2000, 10.0, 2)
    assert gaps[0] == 0 and abs(sum(gaps) / (len(gaps) - 1) - 0.1) < 0.01
    prompts = synthetic_prompts(3, 7, seed=0)
    assert prompts == synthetic_prompts(3, 7, seed=0) and all(len(p.split()) == 7 for p in prompts)
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    assert load_dataset(str(path), 5) == ["a", "b", "a", "b", "a"]
    path.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="prompt"):
        load_dataset(str(path), 1)


@pytest.mark.parametrize("argv", [["--request-rate", "0"], ["--request-rate", "fast"], ["--num-requests", "0"],
                                  ["--max-concurrency", "-1"]])
def test_bad_bench_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as sock:  # a free port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ValueError, match="--model"):
        run_bench_serve(parse("--base-url", f"http://127.0.0.1:{port}", "--num-requests", "1"))
