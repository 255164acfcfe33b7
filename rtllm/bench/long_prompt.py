"""Long-prompt benchmark (``rtllm bench throughput --long-prompt-len L``): stalled streams.

The ``--num-requests`` normal requests start together as streams. Once every
stream has produced ``--long-prompt-after-tokens`` (M) tokens (or ended), one
extra request with an L-token random prompt is submitted. Without chunked
context its whole prefill runs in one step, and every running stream waits for
that step; with ``--enable-chunked-prefill`` it is spread over steps of at most
``--max-num-tokens`` tokens, decode tokens included.

The ``long_prompt`` section reports, for the normal streams only:

- ``window_itl_ms``: inter-token latencies (mean, p50, p90, p99, max) of the
  tokens each stream produced after the long prompt was submitted, up to and
  including its first token at or after the long request's first token (the
  window where a non-chunked prefill stalls them; see :func:`window_gaps`);
- ``baseline_itl_ms``: their inter-token latencies before the submission;

and the long request's ``long_ttft_ms`` and ``long_e2e_latency_ms``. The report's
main figures cover the normal streams only. Without chunked prefill the long
prompt must fit a step beside the streams' decode tokens, so ``--max-num-tokens``
must be at least L + ``--num-requests`` (:func:`check_long_prompt_budget`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import BenchmarkReport, RequestRecord, summarize_ms
from rtllm.bench.throughput import finish_report, run_requests, start_measuring, stream_request

logger = logging.getLogger(__name__)

DEFAULT_AFTER_TOKENS = 8
_MS = 1000.0


def check_long_prompt_budget(
    long_prompt_len: int, num_streams: int, max_num_tokens: int, enable_chunked_prefill: bool
) -> None:
    """Raise ``ValueError`` (naming the options) if a non-chunked long prompt cannot run.

    Without chunked prefill the engine refuses a prompt longer than
    ``--max-num-tokens``, and schedules one only in a step with room for all of it
    beside the running streams' decode tokens: ``L + num_streams <= max_num_tokens``.
    """
    if enable_chunked_prefill:
        return
    needed = long_prompt_len + num_streams
    if needed > max_num_tokens:
        raise ValueError(
            f"--max-num-tokens is {max_num_tokens}: without --enable-chunked-prefill the whole "
            f"--long-prompt-len {long_prompt_len} prompt is prefilled in one step, beside one "
            f"decode token for each of the {num_streams} running streams, so --max-num-tokens must "
            f"be >= {needed}. Raise --max-num-tokens (the non-chunked baseline), or pass "
            "--enable-chunked-prefill to prefill it in chunks of --max-num-tokens"
        )


def window_gaps(token_times: Sequence[float], start: float, end: float) -> list[float]:
    """Inter-token gaps of one stream inside the window ``(start, end]``.

    Every gap ending at a token after ``start`` counts, up to and including the
    gap of the first token at or after ``end`` (that token may be the one delayed
    by the step that also produced the long request's first token).
    """
    gaps = []
    for previous, current in zip(token_times, token_times[1:], strict=False):
        if current <= start:
            continue
        gaps.append(current - previous)
        if current >= end:
            break
    return gaps


def _gaps_before(token_times: Sequence[float], start: float) -> list[float]:
    return [b - a for a, b in zip(token_times, token_times[1:], strict=False) if b <= start]


@dataclass(slots=True)
class LongPromptRun:
    """Records of the normal streams and of the long request (None if it failed)."""

    streams: list[RequestRecord] = field(default_factory=list)
    long: RequestRecord | None = None
    errors: list[str] = field(default_factory=list)


async def run_long_prompt_async(
    llm: Any,
    streams: Sequence[BenchRequest],
    long_request: BenchRequest,
    after_tokens: int = DEFAULT_AFTER_TOKENS,
    progress: tqdm | None = None,
) -> LongPromptRun:
    """Start every stream; submit ``long_request`` once each produced ``after_tokens``.

    A stream that ends (or fails) before producing ``after_tokens`` tokens counts
    as ready, so the long request is always submitted.
    """
    from rtllm.executor.result import RequestError

    run = LongPromptRun()
    records: list[RequestRecord | None] = [None] * len(streams)
    ready = asyncio.Event()
    num_ready = 0

    def mark_ready() -> None:
        nonlocal num_ready
        num_ready += 1
        if num_ready == len(streams):
            ready.set()

    async def stream(index: int, request: BenchRequest) -> None:
        flagged = False

        def on_tokens(count: int) -> None:
            nonlocal flagged
            if not flagged and count >= after_tokens:
                flagged = True
                mark_ready()

        try:
            records[index], _ = await stream_request(
                llm, request.inputs, request.sampling_params(), on_tokens
            )
        except (RequestError, RuntimeError) as exc:
            logger.warning("stream %d failed: %s", index, exc)
            run.errors.append(str(exc))
        finally:
            if not flagged:
                flagged = True
                mark_ready()
            if progress is not None:
                progress.update(1)

    async def long() -> None:
        await ready.wait()
        logger.info(
            "all streams have %d token(s): submitting the %d-token prompt",
            after_tokens,
            len(long_request.input_ids or ()),
        )
        try:
            run.long, _ = await stream_request(
                llm, long_request.inputs, long_request.sampling_params()
            )
        except (RequestError, RuntimeError) as exc:
            logger.warning("the long-prompt request failed: %s", exc)
            run.errors.append(f"long prompt: {exc}")
        if progress is not None:
            progress.update(1)

    if not streams:
        ready.set()
    tasks = [asyncio.ensure_future(stream(i, r)) for i, r in enumerate(streams)]
    tasks.append(asyncio.ensure_future(long()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    run.streams = [r for r in records if r is not None]
    return run


def long_prompt_section(
    run: LongPromptRun, long_request: BenchRequest, after_tokens: int, num_streams: int
) -> dict[str, Any]:
    """The ``long_prompt`` report section (see the module docstring)."""
    long = run.long
    section: dict[str, Any] = {
        "long_prompt_len": len(long_request.input_ids or ()),
        "long_prompt_after_tokens": after_tokens,
        "num_streams": num_streams,
    }
    if long is None or long.first_token_time is None:
        section["error"] = "the long-prompt request failed; no window"
        return section
    start, end = long.submit_time, long.first_token_time
    window = [g for r in run.streams for g in window_gaps(r.token_times, start, end)]
    section.update(
        {
            "streams_running_at_submit": sum(1 for r in run.streams if r.end_time > start),
            "streams_running_at_first_token": sum(
                1 for r in run.streams if r.token_times and r.token_times[-1] >= end
            ),
            "long_ttft_ms": (end - start) * _MS,
            "long_e2e_latency_ms": long.e2e_latency * _MS,
            "window_itl_ms": summarize_ms(window),
            "baseline_itl_ms": summarize_ms(
                [g for r in run.streams for g in _gaps_before(r.token_times, start)]
            ),
        }
    )
    return section


def long_prompt_benchmark(
    llm: Any,
    streams: Sequence[BenchRequest],
    long_request: BenchRequest,
    *,
    after_tokens: int = DEFAULT_AFTER_TOKENS,
    warmup_set: Sequence[BenchRequest] = (),
    metadata: dict[str, Any] | None = None,
    show_progress: bool = True,
    sections: dict[str, dict[str, Any] | None] | None = None,
) -> BenchmarkReport:
    """Warm up with ``warmup_set`` (all at once), run the workload, build the report.

    The report's figures cover the normal ``streams``; the ``long_prompt`` section
    is :func:`long_prompt_section`. Raises ``ValueError`` if a stream would end
    before producing ``after_tokens`` tokens.
    """
    if not streams:
        raise ValueError("the long-prompt benchmark needs at least one stream (--num-requests)")
    shortest = min(r.output_tokens for r in streams)
    if shortest <= after_tokens:
        raise ValueError(
            f"--long-prompt-after-tokens ({after_tokens}) must be smaller than every stream's "
            f"output length (the shortest is {shortest}; raise --output-len), so that the streams "
            "are still running when the long prompt arrives"
        )
    if warmup_set:
        logger.info("warming up with %d request(s)", len(warmup_set))
        run_requests(llm, warmup_set)
        # Once through the scenario itself (other tokens: no prefix-cache hit later), so
        # the measured run pays no one-time cost (kernel compilation for long contexts).
        logger.info("warming up with one long-prompt scenario")
        # The same shapes as the measured run (batch and chunk sizes), other tokens.
        warm_streams = [_other_tokens(r) for r in streams]
        asyncio.run(run_long_prompt_async(llm, warm_streams, _other_tokens(long_request), after_tokens))
    kv_before = start_measuring(llm)
    with tqdm(
        total=len(streams) + 1, desc="long-prompt benchmark", disable=not show_progress, unit="req"
    ) as bar:
        run = asyncio.run(run_long_prompt_async(llm, streams, long_request, after_tokens, bar))
    section = long_prompt_section(run, long_request, after_tokens, len(streams))
    if section.get("streams_running_at_first_token") == 0:
        logger.warning(
            "every stream ended before the long prompt's first token: raise --output-len"
        )
    meta: dict[str, Any] = {
        "mode": "throughput",
        "workload": "long-prompt",
        "concurrency": "unlimited",
        "warmup": len(warmup_set),
        "figures": "the normal streams (the long request is in long_prompt)",
    }
    meta.update(metadata or {})
    llm_args = getattr(llm, "args", None)
    for name in ("enable_chunked_prefill", "max_num_tokens"):
        if hasattr(llm_args, name):
            section[name] = getattr(llm_args, name)
    return finish_report(
        llm, run.streams, run.errors, meta, kv_before, {**(sections or {}), "long_prompt": section}
    )


def _other_tokens(request: BenchRequest) -> BenchRequest:
    """The same request with its prompt rotated: same length and vocabulary, other prefix."""
    if request.input_ids is None:
        return request
    ids = request.input_ids
    half = len(ids) // 2 or 1
    return dataclasses.replace(request, input_ids=ids[half:] + ids[:half])
