"""``/health`` follows the engine loop; ``/metrics`` counts requests, tokens and latencies."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
from serve_helpers import SERVED_NAME, call, make_llm, metric_value, run, sse_events

from rtllm import LLM
from rtllm.serve import build_app


def test_metrics_count_requests_tokens_and_latencies(llm: LLM) -> None:
    app = build_app(llm, SERVED_NAME)  # its own registry: counts start at zero
    plain = call(app, "POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "ignore_eos": True})
    streamed = call(app, "POST", "/v1/completions",
                    json={"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True, "stream": True,
                          "stream_options": {"include_usage": True}})
    assert call(app, "POST", "/v1/completions", json={"prompt": "x", "suffix": "!"}).status_code == 400
    prompt_tokens = plain.json()["usage"]["prompt_tokens"] + sse_events(streamed.text)[-2]["usage"]["prompt_tokens"]

    response = call(app, "GET", "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    labels = {"model_name": SERVED_NAME}
    assert metric_value(text, "rtllm:prompt_tokens_total", **labels) == prompt_tokens
    assert metric_value(text, "rtllm:generation_tokens_total", **labels) == 10
    assert metric_value(text, "rtllm:requests_finished_total", finished_reason="length", **labels) == 2
    assert metric_value(text, "rtllm:requests_rejected_total", **labels) == 1
    assert metric_value(text, "rtllm:time_to_first_token_seconds_count", **labels) == 2
    assert metric_value(text, "rtllm:inter_token_latency_seconds_count", **labels) == 5 + 3
    assert metric_value(text, "rtllm:e2e_request_latency_seconds_count", **labels) == 2
    assert metric_value(text, "rtllm:e2e_request_latency_seconds_sum", **labels) > 0
    assert metric_value(text, "rtllm:num_requests_running", **labels) == 0
    assert metric_value(text, "rtllm:num_requests_waiting", **labels) == 0
    assert metric_value(text, "rtllm:kv_cache_usage_perc", **labels) == 0
    # Engine-wide totals (the shared LLM has served other tests): present and consistent.
    assert 0 <= metric_value(text, "rtllm:prefix_cache_hits", **labels) <= metric_value(
        text, "rtllm:prefix_cache_queries", **labels)
    assert metric_value(text, "rtllm:num_preemptions", **labels) == 0
    assert metric_value(text, "rtllm:engine_alive", **labels) == 1


def test_health_is_503_while_the_engine_stalls_with_work(model_dir: str) -> None:
    llm = make_llm(model_dir)
    gate = threading.Event()
    runner = llm.executor.engine.runner
    original = runner.execute

    def blocked(*args: Any, **kwargs: Any) -> Any:
        gate.wait(timeout=30)
        return original(*args, **kwargs)

    runner.execute = blocked
    app = build_app(llm, SERVED_NAME, stall_timeout_s=0.3)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/health")).status_code == 200
            request = asyncio.ensure_future(
                client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3}))
            await asyncio.sleep(0.1)
            assert (await client.get("/health")).status_code == 200  # just submitted
            text = (await client.get("/metrics")).text
            assert metric_value(text, "rtllm:num_requests_running", model_name=SERVED_NAME) == 1
            assert metric_value(text, "rtllm:kv_cache_usage_perc", model_name=SERVED_NAME) > 0
            await asyncio.sleep(0.5)
            stalled = await client.get("/health")
            assert stalled.status_code == 503
            assert "not completed a step" in stalled.json()["reason"]
            gate.set()
            assert (await request).status_code == 200
            assert (await client.get("/health")).status_code == 200

    try:
        run(scenario())
    finally:
        gate.set()
        llm.shutdown()


def test_health_is_503_once_the_engine_loop_is_gone(model_dir: str) -> None:
    llm = make_llm(model_dir)
    app = build_app(llm, SERVED_NAME)
    assert call(app, "GET", "/health").status_code == 200
    llm.executor.shutdown()  # the loop thread ends, as if it had died
    dead = call(app, "GET", "/health")
    assert dead.status_code == 503 and "stopped" in dead.json()["reason"]
    llm.shutdown()
    gone = call(app, "GET", "/health")
    assert gone.status_code == 503 and "shut down" in gone.json()["reason"]
    assert metric_value(call(app, "GET", "/metrics").text, "rtllm:engine_alive", model_name=SERVED_NAME) == 0


def test_unknown_route_uses_openai_error_format(llm: LLM) -> None:
    app = build_app(llm, SERVED_NAME)
    response = call(app, "GET", "/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
