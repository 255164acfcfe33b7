"""Latency benchmark: one request at a time, so each sees an otherwise idle engine.

TTFT here is the prefill time of a lone request and TPOT its batch-size-1 decode
step time; the figures are the same as the throughput benchmark's. With
``--shared-prefix-len`` each request finds the shared prefix cached by the ones
before it (or by the warm-up), so TTFT measures the prefill of the rest only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import BenchmarkReport
from rtllm.bench.throughput import benchmark


def latency_benchmark(
    llm: Any,
    requests: Sequence[BenchRequest],
    *,
    warmup: int = 0,
    metadata: dict[str, Any] | None = None,
    show_progress: bool = True,
    warmup_set: Sequence[BenchRequest] | None = None,
    sections: dict[str, dict[str, Any] | None] | None = None,
) -> BenchmarkReport:
    """Run ``requests`` sequentially (concurrency 1) after ``warmup`` discarded ones.

    ``warmup_set`` and ``sections``: see :func:`rtllm.bench.throughput.benchmark`.
    """
    return benchmark(llm, requests, concurrency=1, warmup=warmup, mode="latency",
                     metadata=metadata, show_progress=show_progress, warmup_set=warmup_set,
                     sections=sections)
