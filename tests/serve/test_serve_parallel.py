"""The server over tensor-parallel workers: it answers like a single process, reports
the workers' load, and ``/health`` turns 503 (naming the rank) when a worker dies."""

from __future__ import annotations

import os
import signal

from serve_helpers import SERVED_NAME, call, make_llm, metric_value, wait_until

from rtllm.serve import build_app


def test_tp2_server_answers_and_fails_health_when_a_worker_dies(model_dir: str) -> None:
    body = {"prompt": "Hello there", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    single = make_llm(model_dir)
    try:
        expected = call(build_app(single, SERVED_NAME), "POST", "/v1/completions", json=body).json()
    finally:
        single.shutdown()
    llm = make_llm(model_dir, tensor_parallel_size=2)
    try:
        app = build_app(llm, SERVED_NAME)
        assert call(app, "GET", "/health").status_code == 200
        got = call(app, "POST", "/v1/completions", json=body).json()
        assert got["choices"][0]["text"] == expected["choices"][0]["text"]
        too_long = call(app, "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 10**6})
        assert too_long.status_code == 400 and "max_tokens" in too_long.json()["error"]["message"]
        # rank 0's load reports reach /metrics
        assert wait_until(lambda: metric_value(call(app, "GET", "/metrics").text, "rtllm:engine_steps",
                                               model_name=SERVED_NAME) >= 6)

        os.kill(llm.executor.worker_pids[1], signal.SIGKILL)
        assert wait_until(lambda: call(app, "GET", "/health").status_code == 503)
        health = call(app, "GET", "/health")
        assert "rank 1" in health.text
        failed = call(app, "POST", "/v1/completions", json=body)
        assert failed.status_code >= 500 and "rank 1" in failed.text
    finally:
        llm.shutdown()
