"""``rtllm bench serve``: load-test any OpenAI-compatible server with streamed completions.

Requests arrive as a seeded Poisson process at ``--request-rate`` (``inf``: all at
once), at most ``--max-concurrency`` in flight. Prompts are synthetic (random words,
``--input-len`` of them) or read from a JSON-lines ``--dataset`` of ``{"prompt": ...}``.
Each request is streamed; the time to first token (TTFT) is taken at the first chunk
with text, inter-token latencies (ITL) between chunks with text, and the output
length from the final chunk's ``usage`` when the server sends it (else the number of
text chunks). TPOT is ``(latency - TTFT) / (output tokens - 1)`` per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "they", "this", "have", "had", "are", "not", "but", "be", "or", "an", "which", "one", "you", "were", "all", "we", "she", "there", "been", "their", "has", "would", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three"]


@dataclass(slots=True)
class RequestRecord:
    """What one request measured (times in seconds)."""

    success: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def synthetic_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """``num`` prompts of ``input_len`` random common words (about one token each)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=input_len)) for _ in range(num)]


def load_dataset(path: str, num: int) -> list[str]:
    """``num`` prompts from a JSON-lines file of ``{"prompt": ...}`` (cycled if short)."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
                raise ValueError(f'{path}:{lineno}: each line must be an object with a non-empty "prompt" string')
            prompts.append(item["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return [prompts[i % len(prompts)] for i in range(num)]


def arrival_gaps(num: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps at ``rate``/s (0 if inf)."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(rate) for _ in range(num - 1)]


def _payload(chat: bool, model: str, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if not args.no_stream_usage:
        body["stream_options"] = {"include_usage": True}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


async def _send(client: Any, url: str, body: dict[str, Any], chat: bool, headers: dict[str, str]) -> RequestRecord:
    record = RequestRecord()
    start = time.perf_counter()
    last = start
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {text[:300]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = str(chunk["error"].get("message", chunk["error"]))
                    return record
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    record.prompt_tokens = usage.get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if record.ttft is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                    chunks += 1
        record.latency = time.perf_counter() - start
        record.output_tokens = usage_tokens if usage_tokens is not None else chunks
        record.success = True
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_benchmark(
    args: argparse.Namespace, prompts: list[str], transport: Any | None = None
) -> tuple[list[RequestRecord], float, str]:
    """Send every prompt; returns the records, the wall time and the model name."""
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    chat = args.endpoint.rstrip("/").endswith("chat/completions")
    limits = httpx.Limits(max_connections=args.max_concurrency or None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits, transport=transport) as client:
        model = args.model
        if model is None:
            try:
                response = await client.get(f"{base}/v1/models", headers=headers)
                response.raise_for_status()
                model = str(response.json()["data"][0]["id"])
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                raise ValueError(f"could not get the model name from {base}/v1/models ({exc}); "
                                 "pass --model") from None
        url = f"{base}{args.endpoint}"
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(prompt: str) -> RequestRecord:
            body = _payload(chat, model, prompt, args)
            if semaphore is None:
                return await _send(client, url, body, chat, headers)
            async with semaphore:
                return await _send(client, url, body, chat, headers)

        tasks = []
        start = time.perf_counter()
        for gap, prompt in zip(arrival_gaps(len(prompts), args.request_rate, args.seed), prompts, strict=True):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(one(prompt)))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return records, duration, model


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99))}


def summarize(records: list[RequestRecord], duration: float, args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The report as a JSON-able dict (latencies in milliseconds)."""
    ok = [r for r in records if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    errors = [r.error for r in records if not r.success and r.error]
    return {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": _stats_ms([r.latency for r in ok]),
        "errors": errors[:10],
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]

    def row(name: str, value: Any) -> None:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<44}{shown:>16}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    row("Request rate (req/s):", report["request_rate"])
    row("Max concurrency:", report["max_concurrency"] or "none")
    row("Benchmark duration (s):", report["duration_s"])
    row("Total input tokens (from usage):", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"])
    row("Output token throughput (tok/s):", report["output_throughput"])
    row("Total token throughput (tok/s):", report["total_token_throughput"])
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append("{:-^60}".format(f" {title} "))
        short = key.split("_")[0].upper()
        for stat in ("mean", "p50", "p90", "p99"):
            row(f"{stat.capitalize() if stat == 'mean' else stat.upper()} {short} (ms):", report[key][stat])
    for error in report["errors"][:3]:
        lines.append(f"error: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"request rate must be a number or 'inf', got {value!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (or 'inf'), got {value!r}")
    return rate


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def add_serving_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``rtllm bench`` subcommands."""
    parser = bench_subparsers.add_parser(
        "serve", help="benchmark a running OpenAI-compatible server",
        description="Send streamed completion requests to an OpenAI-compatible server with Poisson "
                    "arrivals and report throughput, TTFT, TPOT, ITL and end-to-end latency.",
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    parser.add_argument("--endpoint", default="/v1/completions",
                        help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--num-requests", type=_positive_int, default=100, help="requests to send (default: 100)")
    parser.add_argument("--request-rate", type=_rate, default=math.inf,
                        help="mean arrivals per second (Poisson), or inf for all at once (default: inf)")
    parser.add_argument("--max-concurrency", type=_positive_int, default=None,
                        help="most requests in flight (default: no limit)")
    parser.add_argument("--input-len", type=_positive_int, default=128,
                        help="words per synthetic prompt (default: 128)")
    parser.add_argument("--output-len", type=_positive_int, default=128,
                        help="max_tokens of each request (default: 128)")
    parser.add_argument("--dataset", default=None, help='JSON-lines file of {"prompt": ...} (default: synthetic)')
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: 0)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature to send")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos=true (rtllm, vLLM, TensorRT-LLM) for exactly --output-len tokens")
    parser.add_argument("--no-stream-usage", action="store_true",
                        help="do not send stream_options.include_usage (count text chunks as tokens)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    parser.add_argument("--report-json", default=None, metavar="PATH", help="also write the report as JSON")
    parser.set_defaults(func=run_bench_serve)
    return parser


def run_bench_serve(args: argparse.Namespace, transport: Any | None = None) -> int:
    """Run the benchmark, print the text report, write JSON if asked. 1 if any request failed."""
    if args.dataset:
        prompts = load_dataset(args.dataset, args.num_requests)
    else:
        prompts = synthetic_prompts(args.num_requests, args.input_len, args.seed)
    records, duration, model = asyncio.run(run_benchmark(args, prompts, transport))
    report = summarize(records, duration, args, model)
    print(format_report(report))
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {args.report_json}", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1
