"""Prometheus metrics of the server (``GET /metrics``), named like vLLM's with ``rtllm:``.

Counters and histograms are updated by the request handlers through a
:class:`RequestTimer` per request; gauges of engine load (running and waiting
requests, KV-cache usage) are read from the executor at scrape time. Each app has
its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from rtllm.llmapi.llm import LLM

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Gauges read from the executor's :meth:`stats` at each scrape."""

    def __init__(self, llm: LLM, model_name: str) -> None:
        self._llm = llm
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        try:
            executor = self._llm.executor
            stats = executor.stats()
            alive = executor.is_alive
        except RuntimeError:  # shut down
            stats, alive = None, False
        labels = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("rtllm:engine_alive", "1 while the engine loop runs.", 1.0 if alive else 0.0)
        if not stats:  # shut down, or parallel workers that have not reported yet
            return
        yield gauge("rtllm:num_requests_running", "Requests in the running batch.", stats["num_running"])
        yield gauge("rtllm:num_requests_waiting", "Requests waiting to be scheduled.", stats["num_waiting"])
        total = stats["kv_blocks_total"]
        usage = stats["kv_blocks_used"] / total if total else 0.0
        yield gauge("rtllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", usage)
        yield gauge("rtllm:kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield gauge("rtllm:engine_steps", "Engine steps run so far.", stats["num_steps"])
        yield gauge("rtllm:prefix_cache_hits", "Full prompt KV blocks served from the prefix cache so far.",
                    stats["prefix_cache_hit_blocks"])
        yield gauge("rtllm:prefix_cache_queries", "Full prompt KV blocks looked up in the prefix cache so far.",
                    stats["prefix_cache_queried_blocks"])
        yield gauge("rtllm:num_preemptions", "Requests paused for recomputation so far (MAX_UTILIZATION).",
                    stats["num_paused_total"])


class RequestTimer:
    """Times one request (TTFT, inter-token latency, end to end) and counts its tokens."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int) -> None:
        self._metrics = metrics
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_generated = 0
        self.finished = False
        metrics.prompt_tokens.inc(num_prompt_tokens)
        metrics.inflight.add(self)

    def on_tokens(self, num_tokens: int) -> None:
        """Record ``num_tokens`` tokens received now."""
        if num_tokens <= 0 or self.finished:
            return
        now = time.monotonic()
        m = self._metrics
        if self.first_token is None:
            self.first_token = now
            m.ttft.observe(now - self.arrival)
            num_gaps = num_tokens - 1
            gap = 0.0
        else:
            num_gaps = num_tokens
            gap = (now - (self.last_token or now)) / num_tokens
        for _ in range(num_gaps):
            m.itl.observe(gap)
        self.last_token = now
        self.num_generated += num_tokens
        m.generation_tokens.inc(num_tokens)

    def finish(self, finish_reason: str) -> None:
        """Record the end of the request (only the first call counts)."""
        if self.finished:
            return
        self.finished = True
        m = self._metrics
        m.inflight.discard(self)
        m.requests_finished.labels(finished_reason=finish_reason).inc()
        m.e2e.observe(time.monotonic() - self.arrival)


class ServerMetrics:
    """The app's Prometheus registry and the request-level metrics in it."""

    def __init__(self, llm: LLM, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.inflight: set[RequestTimer] = set()
        reg = self.registry
        label = {"model_name": model_name}
        self.prompt_tokens = Counter(
            "rtllm:prompt_tokens", "Prompt tokens of admitted requests.", ["model_name"], registry=reg
        ).labels(**label)
        self.generation_tokens = Counter(
            "rtllm:generation_tokens", "Generated tokens.", ["model_name"], registry=reg
        ).labels(**label)
        self._finished = Counter(
            "rtllm:requests_finished",
            "Finished requests by finish reason (stop, length, cancelled, error).",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self.requests_finished = _Bound(self._finished, model_name)
        self.ttft = Histogram(
            "rtllm:time_to_first_token_seconds", "Time to first token.", ["model_name"],
            buckets=_TTFT_BUCKETS, registry=reg,
        ).labels(**label)
        self.itl = Histogram(
            "rtllm:inter_token_latency_seconds", "Time between consecutive output tokens.",
            ["model_name"], buckets=_ITL_BUCKETS, registry=reg,
        ).labels(**label)
        self.e2e = Histogram(
            "rtllm:e2e_request_latency_seconds", "End-to-end request latency.", ["model_name"],
            buckets=_E2E_BUCKETS, registry=reg,
        ).labels(**label)
        self.rejected = Counter(
            "rtllm:requests_rejected", "Requests answered with an error before reaching the engine.",
            ["model_name"], registry=reg,
        ).labels(**label)
        reg.register(_EngineCollector(llm, model_name))

    def start_request(self, num_prompt_tokens: int) -> RequestTimer:
        """Start timing a request that has been admitted to the engine."""
        return RequestTimer(self, num_prompt_tokens)

    def oldest_inflight_arrival(self) -> float | None:
        """Monotonic arrival time of the oldest unfinished request, None when idle."""
        inflight = list(self.inflight)
        return min((t.arrival for t in inflight), default=None)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Bound:
    """``counter.labels(model_name=..., finished_reason=...)`` with the model bound."""

    def __init__(self, counter: Counter, model_name: str) -> None:
        self._counter = counter
        self._model_name = model_name

    def labels(self, *, finished_reason: str) -> Counter:
        return self._counter.labels(model_name=self._model_name, finished_reason=finished_reason)
