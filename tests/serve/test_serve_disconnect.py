"""A client that goes away aborts its request: KV blocks return within one engine step.

A real uvicorn server on 127.0.0.1; the engine is slowed to ~10 ms a step so an
unaborted request (300 tokens) would run for seconds.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_helpers import SERVED_NAME, LiveServer, make_llm, metric_value, wait_until

from rtllm import LLM
from rtllm.serve import build_app

MAX_TOKENS = 300


@pytest.fixture(scope="module")
def slow_server(model_dir: str) -> Iterator[tuple[LLM, LiveServer, list[int]]]:
    llm = make_llm(model_dir)
    executor = llm.executor
    runner = executor.engine.runner
    original_execute, original_abort = runner.execute, executor.abort
    steps_at_abort: list[int] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.01)
        return original_execute(*args, **kwargs)

    def spy_abort(request_id: int) -> None:
        steps_at_abort.append(executor.engine.num_steps)
        original_abort(request_id)

    runner.execute = slow
    executor.abort = spy_abort
    with LiveServer(build_app(llm, SERVED_NAME)) as server:
        yield llm, server, steps_at_abort
    llm.shutdown()


def _send(port: int, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


def _cancelled(server: LiveServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return metric_value(text, "rtllm:requests_finished_total", finished_reason="cancelled", model_name=SERVED_NAME)


def _check_aborted(llm: LLM, server: LiveServer, steps_at_abort: list[int], cancelled_before: float) -> None:
    engine = llm.executor.engine
    kv = engine.kv_cache
    assert wait_until(lambda: kv.num_free_blocks == kv.num_blocks, timeout=2), "KV blocks were not freed"
    assert steps_at_abort, "the request was not aborted"
    # The abort is taken in between steps: at most the step running at that moment finishes.
    assert engine.num_steps - steps_at_abort[-1] <= 1
    assert not engine.requests and not engine.has_work
    assert _cancelled(server) == cancelled_before + 1


def test_stream_disconnect_aborts(slow_server: tuple[LLM, LiveServer, list[int]]) -> None:
    llm, server, steps_at_abort = slow_server
    kv = llm.executor.engine.kv_cache
    before = _cancelled(server)
    start_steps = llm.executor.engine.num_steps
    body = {"prompt": "Hello, my name is", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    sock = _send(server.port, body)
    received = b""
    deadline = time.monotonic() + 10
    while received.count(b"data:") < 2 and time.monotonic() < deadline:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert kv.num_free_blocks < kv.num_blocks  # the request holds blocks
    sock.close()
    _check_aborted(llm, server, steps_at_abort, before)
    assert llm.executor.engine.num_steps - start_steps < MAX_TOKENS


def test_non_streaming_disconnect_aborts(slow_server: tuple[LLM, LiveServer, list[int]]) -> None:
    llm, server, steps_at_abort = slow_server
    executor = llm.executor
    before = _cancelled(server)
    start_steps = executor.engine.num_steps
    sock = _send(server.port, {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert wait_until(lambda: executor.engine.num_steps >= start_steps + 3, timeout=10)
    assert executor.stats()["num_running"] == 1 and executor.stats()["kv_blocks_used"] > 0
    sock.close()
    _check_aborted(llm, server, steps_at_abort, before)
    assert executor.engine.num_steps - start_steps < MAX_TOKENS


def test_server_still_serves_after_disconnects(slow_server: tuple[LLM, LiveServer, list[int]]) -> None:
    _, server, _ = slow_server
    response = httpx.post(f"{server.base_url}/v1/completions",
                          json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True}, timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
