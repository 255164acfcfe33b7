"""Offline throughput benchmark: many streamed requests in flight at once.

Requests go through :meth:`rtllm.LLM.generate_async` with ``streaming=True`` and
are consumed concurrently by asyncio workers, each recording when every token
arrives. With ``concurrency=None`` all requests are submitted at once (the engine
batches them as capacity allows); with ``concurrency=N`` at most N are in flight.
Warm-up requests run first and are left out of every figure, including the
report's ``kv_cache`` section (the engine's prefix-cache counters over the
measured run). :func:`stream_request` is the streaming primitive the workloads of
:mod:`rtllm.bench.multi_turn` and :mod:`rtllm.bench.long_prompt` build on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import (
    BenchmarkReport,
    RequestRecord,
    compute_report,
    kv_cache_section,
    peak_gpu_memory_bytes,
    read_kv_cache_counters,
    reset_peak_gpu_memory,
)
from rtllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunResult:
    """Records of the requests that finished, and the errors of those that failed."""

    records: list[RequestRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def stream_request(
    llm: Any,
    inputs: str | list[int],
    params: SamplingParams,
    on_tokens: Callable[[int], None] | None = None,
) -> tuple[RequestRecord, list[int]]:
    """Stream one request; return its timing record and generated token ids.

    ``on_tokens`` is called with the number of tokens received so far after each
    delta that brought tokens. Raises ``RuntimeError`` unless the request finished
    with ``length`` or ``stop`` (``RequestError``, a ``RuntimeError``, if it failed).
    """
    submit = time.perf_counter()
    result = llm.generate_async(inputs, params, streaming=True)
    token_times: list[float] = []
    token_ids: list[int] = []
    try:
        async for out in result:
            diff = out.outputs[0].token_ids_diff
            if diff:
                now = time.perf_counter()
                token_times.extend([now] * len(diff))
                token_ids.extend(diff)
                if on_tokens is not None:
                    on_tokens(len(token_times))
    except BaseException:
        result.abort()  # a no-op once finished (e.g. after a RequestError)
        raise
    end = time.perf_counter()
    finish_reason = result.outputs[0].finish_reason
    if finish_reason not in ("length", "stop"):
        raise RuntimeError(f"request {result.request_id} finished with {finish_reason!r}")
    record = RequestRecord(
        submit_time=submit,
        end_time=end,
        token_times=token_times,
        input_tokens=len(result.prompt_token_ids),
    )
    return record, token_ids


async def _run_one(llm: Any, request: BenchRequest) -> RequestRecord:
    record, _ = await stream_request(llm, request.inputs, request.sampling_params())
    return record


async def run_requests_async(
    llm: Any,
    requests: Sequence[BenchRequest],
    concurrency: int | None = None,
    progress: tqdm | None = None,
) -> RunResult:
    """Run ``requests`` through ``llm`` with at most ``concurrency`` in flight.

    Requests are submitted in order. A request that fails is logged and counted
    in ``errors``; the others go on. Invalid requests (rejected at submission,
    e.g. longer than ``max_seq_len``) raise ``ValueError`` at once.
    """
    from rtllm.executor.result import RequestError

    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    run = RunResult()
    records: list[RequestRecord | None] = [None] * len(requests)
    pending = iter(enumerate(requests))

    async def worker() -> None:
        for index, request in pending:
            try:
                records[index] = await _run_one(llm, request)
            except (RequestError, RuntimeError) as exc:
                logger.warning("benchmark request %d failed: %s", index, exc)
                run.errors.append(str(exc))
            if progress is not None:
                progress.update(1)

    num_workers = len(requests) if concurrency is None else min(concurrency, len(requests))
    tasks = [asyncio.ensure_future(worker()) for _ in range(num_workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    run.records = [r for r in records if r is not None]
    return run


def run_requests(
    llm: Any,
    requests: Sequence[BenchRequest],
    concurrency: int | None = None,
    desc: str | None = None,
) -> RunResult:
    """Blocking :func:`run_requests_async`, with a tqdm bar labelled ``desc`` (none if None)."""
    with tqdm(total=len(requests), desc=desc or "", disable=desc is None, unit="req") as bar:
        return asyncio.run(run_requests_async(llm, requests, concurrency, bar))


def warmup_requests(requests: Sequence[BenchRequest], count: int) -> list[BenchRequest]:
    """The first ``count`` requests of the dataset, cycling when it is shorter."""
    if count <= 0 or not requests:
        return []
    return [requests[i % len(requests)] for i in range(count)]


def start_measuring(llm: Any) -> dict[str, int] | None:
    """Reset the GPU peak-memory counter and snapshot the KV cache counters."""
    reset_peak_gpu_memory(getattr(llm, "device", None))
    return read_kv_cache_counters(llm)


def finish_report(
    llm: Any,
    records: Sequence[RequestRecord],
    errors: Sequence[str],
    meta: dict[str, Any],
    kv_before: dict[str, int] | None,
    sections: dict[str, dict[str, Any] | None] | None = None,
) -> BenchmarkReport:
    """The report of a measured run started by :func:`start_measuring`.

    Adds the ``kv_cache`` section (the run's prefix-cache counters) to ``sections``
    and the first errors to ``meta``.
    """
    meta = dict(meta)
    if errors:
        meta["errors"] = list(errors[:10])
    report = compute_report(
        records,
        num_failed=len(errors),
        peak_gpu_memory_bytes=peak_gpu_memory_bytes(getattr(llm, "device", None)),
        metadata=meta,
    )
    report.sections = {
        "kv_cache": kv_cache_section(kv_before, read_kv_cache_counters(llm), llm),
        **(sections or {}),
    }
    return report


def benchmark(
    llm: Any,
    requests: Sequence[BenchRequest],
    *,
    concurrency: int | None = None,
    warmup: int = 0,
    mode: str = "throughput",
    metadata: dict[str, Any] | None = None,
    show_progress: bool = True,
    warmup_set: Sequence[BenchRequest] | None = None,
    sections: dict[str, dict[str, Any] | None] | None = None,
) -> BenchmarkReport:
    """Warm up, run ``requests`` and build the report.

    Args:
        llm: A built :class:`rtllm.LLM`.
        requests: The benchmark dataset.
        concurrency: Most requests in flight; None submits all at once.
        warmup: Requests run (and discarded) before measuring.
        mode: Label of the run in the report (``throughput`` or ``latency``).
        metadata: Extra fields for the report's ``metadata``.
        show_progress: Show a tqdm bar while measuring.
        warmup_set: The warm-up requests; None takes the dataset's first ``warmup``.
        sections: Extra report sections (the ``kv_cache`` section is always added).
    """
    if not requests:
        raise ValueError("the benchmark dataset is empty")
    warm = warmup_requests(requests, warmup) if warmup_set is None else list(warmup_set)
    if warm:
        logger.info("warming up with %d request(s)", len(warm))
        run_requests(llm, warm, concurrency)
    kv_before = start_measuring(llm)
    logger.info("benchmarking %d request(s), concurrency %s", len(requests), concurrency or "unlimited")
    run = run_requests(llm, requests, concurrency, desc=f"{mode} benchmark" if show_progress else None)
    meta = {"mode": mode, "concurrency": concurrency if concurrency is not None else "unlimited",
            "warmup": len(warm)}
    meta.update(metadata or {})
    return finish_report(llm, run.records, run.errors, meta, kv_before, sections)


def throughput_benchmark(
    llm: Any,
    requests: Sequence[BenchRequest],
    *,
    concurrency: int | None = None,
    warmup: int = 0,
    metadata: dict[str, Any] | None = None,
    show_progress: bool = True,
    warmup_set: Sequence[BenchRequest] | None = None,
    sections: dict[str, dict[str, Any] | None] | None = None,
) -> BenchmarkReport:
    """Offline throughput: all requests (or ``concurrency`` at a time) in flight.

    ``warmup_set`` and ``sections``: see :func:`benchmark`.
    """
    return benchmark(llm, requests, concurrency=concurrency, warmup=warmup, mode="throughput",
                     metadata=metadata, show_progress=show_progress, warmup_set=warmup_set,
                     sections=sections)
