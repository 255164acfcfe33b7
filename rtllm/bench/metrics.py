"""Benchmark metrics: per-request timing records in, a throughput/latency report out.

Definitions (all times in seconds on one monotonic clock, reported in ms):

- TTFT: ``first_token_time - submit_time`` per request.
- TPOT: ``(last_token_time - first_token_time) / (output_tokens - 1)`` per request
  with at least two output tokens: the mean time per token after the first.
- ITL: every gap between consecutive token timestamps, pooled over all requests.
  Tokens delivered in one streamed delta share a timestamp (a gap of 0).
- E2E latency: ``end_time - submit_time`` per request.
- Duration: from the earliest submission to the latest end; requests/s, output
  tokens/s and total (input + output) tokens/s divide by it.

Percentiles interpolate linearly between the closest ranks (numpy's default).

A report may carry sections (``kv_cache``, ``shared_prefix``, ``multi_turn``,
``long_prompt``): top-level keys of its JSON and blocks of its text table. The
``kv_cache`` section (:func:`kv_cache_section`) holds the difference of the
engine's KV cache counters (``reused_blocks``, ``missed_blocks``,
``onloaded_blocks``, ``offloaded_blocks``, ``alloc_*``) over the measured run and
its ``cache_hit_rate`` = reused / (reused + missed) full prompt blocks looked up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """Timing of one finished request.

    Attributes:
        submit_time: When the request was submitted.
        end_time: When its last delta (with ``finished``) arrived.
        token_times: Arrival time of every output token, in order.
        input_tokens: Prompt length in tokens.
        first_token_time: Arrival of the first token; defaults to ``token_times[0]``.
        output_tokens: Output length; defaults to ``len(token_times)``.
    """

    submit_time: float
    end_time: float
    token_times: list[float] = field(default_factory=list)
    input_tokens: int = 0
    first_token_time: float | None = None
    output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.first_token_time is None and self.token_times:
            self.first_token_time = self.token_times[0]
        if self.output_tokens is None:
            self.output_tokens = len(self.token_times)

    @property
    def ttft(self) -> float | None:
        """Time to first token, or None without output."""
        return None if self.first_token_time is None else self.first_token_time - self.submit_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, or None with < 2 tokens."""
        n = self.output_tokens or 0
        if n < 2 or self.first_token_time is None:
            return None
        last = self.token_times[-1] if self.token_times else self.end_time
        return (last - self.first_token_time) / (n - 1)

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive token timestamps."""
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def e2e_latency(self) -> float:
        """Submission to end."""
        return self.end_time - self.submit_time


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Stats:
    """Mean and percentiles of one latency metric (in the unit it was built with)."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Stats | None:
        """Stats of ``values`` times ``scale``; None when there are none."""
        if not values:
            return None
        xs = [v * scale for v in values]
        return cls(sum(xs) / len(xs), percentile(xs, 50), percentile(xs, 90), percentile(xs, 99), len(xs))

    def to_dict(self) -> dict[str, float | int]:
        """``mean``, ``p50``, ``p90``, ``p99`` and ``count``."""
        return {"mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99, "count": self.count}


_MS = 1000.0


@dataclass(slots=True)
class BenchmarkReport:
    """Figures of one benchmark run; latencies in milliseconds."""

    num_requests: int
    num_failed: int
    total_input_tokens: int
    total_output_tokens: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    itl_ms: Stats | None
    e2e_latency_ms: Stats | None
    peak_gpu_memory_bytes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (stats as ``{mean, p50, p90, p99, count}`` or None).

        Each of ``sections`` (``kv_cache``, ``multi_turn``, ``long_prompt``, ...) is a
        top-level key of its own.
        """
        out: dict[str, Any] = {"metadata": dict(self.metadata)}
        for name in ("num_requests", "num_failed", "total_input_tokens", "total_output_tokens",
                     "duration_s", "request_throughput", "output_throughput", "total_token_throughput"):
            out[name] = getattr(self, name)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
            stats = getattr(self, name)
            out[name] = None if stats is None else stats.to_dict()
        out["peak_gpu_memory_bytes"] = self.peak_gpu_memory_bytes
        for name, section in self.sections.items():
            out[name] = None if section is None else dict(section)
        return out

    def format_table(self) -> str:
        """A human-readable text report."""
        lines: list[str] = []
        title = f"rtllm bench {self.metadata.get('mode', '')}".rstrip()
        lines += ["=" * 64, title, "=" * 64]
        for key in ("model", "device", "dtype", "load_format", "dataset", "concurrency", "warmup",
                    "max_batch_size", "max_num_tokens"):
            if key in self.metadata:
                lines.append(f"{key:<34}{self.metadata[key]}")
        lines.append("-" * 64)
        rows = [
            ("requests", f"{self.num_requests}" + (f" ({self.num_failed} failed)" if self.num_failed else "")),
            ("input tokens", f"{self.total_input_tokens}"),
            ("output tokens", f"{self.total_output_tokens}"),
            ("duration (s)", f"{self.duration_s:.3f}"),
            ("request throughput (req/s)", f"{self.request_throughput:.3f}"),
            ("output throughput (tok/s)", f"{self.output_throughput:.2f}"),
            ("total token throughput (tok/s)", f"{self.total_token_throughput:.2f}"),
        ]
        peak = self.peak_gpu_memory_bytes
        rows.append(("peak GPU memory (GiB)", "n/a" if peak is None else f"{peak / 2**30:.3f}"))
        lines += [f"{name:<34}{value}" for name, value in rows]
        lines.append("-" * 64)
        lines.append(f"{'latency (ms)':<20}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}")
        for name, stats in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms),
                            ("inter-token", self.itl_ms), ("end-to-end", self.e2e_latency_ms)):
            if stats is None:
                lines.append(f"{name:<20}{'n/a':>11}")
            else:
                lines.append(f"{name:<20}{stats.mean:>11.3f}{stats.p50:>11.3f}{stats.p90:>11.3f}{stats.p99:>11.3f}")
        for name, section in self.sections.items():
            lines += format_section(name, section)
        lines.append("=" * 64)
        return "\n".join(lines)


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def format_section(name: str, section: dict[str, Any] | None) -> list[str]:
    """Text-table lines of one report section: scalars as rows, stats dicts as a table.

    A stats dict is one with a ``mean`` key (``{mean, p50, p90, p99[, max], count}``);
    a key whose value is None but ends in ``_ms`` is shown as a stats row of ``n/a``.
    """
    lines = ["-" * 64, name.replace("_", " ")]
    if section is None:
        return [*lines, f"{'':<34}n/a"]
    stats_rows: list[tuple[str, dict[str, Any] | None]] = []
    for key, value in section.items():
        if (isinstance(value, dict) and "mean" in value) or (value is None and key.endswith("_ms")):
            stats_rows.append((key, value))
        elif isinstance(value, dict):
            lines += [f"{key + '.' + k:<34}{_format_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key:<34}{_format_value(value)}")
    if stats_rows:
        lines.append(f"{'(ms)':<24}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
        for key, stats in stats_rows:
            label = key.removesuffix("_ms")
            if stats is None:
                lines.append(f"{label:<24}{'n/a':>8}")
                continue
            cells = "".join(
                f"{stats[k]:>8.2f}" if stats.get(k) is not None else f"{'':>8}"
                for k in ("mean", "p50", "p90", "p99", "max")
            )
            lines.append(f"{label:<24}{cells}  (n={stats.get('count', '?')})")
    return lines


def summarize_ms(values: Sequence[float]) -> dict[str, float | int] | None:
    """``{mean, p50, p90, p99, max, count}`` of ``values`` (seconds) in ms; None if empty."""
    stats = Stats.of(values, _MS)
    if stats is None:
        return None
    return {**stats.to_dict(), "max": max(values) * _MS}


KV_CACHE_COUNTERS = (
    "reused_blocks", "missed_blocks", "onloaded_blocks", "offloaded_blocks",
    "alloc_total_blocks", "alloc_new_blocks",
)


def _kv_cache_manager(llm: Any) -> Any:
    try:
        return llm.executor.engine.kv_cache
    except (AttributeError, RuntimeError):  # no such attribute, or the LLM was shut down
        return None


def read_kv_cache_counters(llm: Any) -> dict[str, int] | None:
    """A snapshot of ``llm.executor.engine.kv_cache.counters``, or None without them.

    Counters that the engine does not have are left out.
    """
    counters = getattr(_kv_cache_manager(llm), "counters", None)
    if counters is None:
        return None
    snapshot = {n: getattr(counters, n) for n in KV_CACHE_COUNTERS if hasattr(counters, n)}
    return {k: int(v) for k, v in snapshot.items() if isinstance(v, int | float)} or None


def kv_cache_section(
    before: dict[str, int] | None, after: dict[str, int] | None, llm: Any = None
) -> dict[str, Any] | None:
    """The prefix-cache counters of the measured run: ``after - before`` per counter.

    ``cache_hit_rate`` is ``reused / (reused + missed)`` over the run (0 without
    lookups); ``enable_block_reuse`` and ``tokens_per_block`` come from ``llm``'s
    KV cache when known, and ``cache_hit_rate_since_start`` from its counters'
    ``cache_hit_rate``. None when the counters could not be read.
    """
    if after is None:
        return None
    base = before or {}
    scope = "measured run (warm-up excluded)" if before else "since start-up"
    section: dict[str, Any] = {"scope": scope}
    kv_cache = _kv_cache_manager(llm)
    for name in ("enable_block_reuse", "tokens_per_block"):
        if hasattr(kv_cache, name):
            section[name] = getattr(kv_cache, name)
    for name, value in after.items():
        section[name] = value - base.get(name, 0)
    if "reused_blocks" in section and "missed_blocks" in section:
        looked_up = section["reused_blocks"] + section["missed_blocks"]
        section["cache_hit_rate"] = section["reused_blocks"] / looked_up if looked_up else 0.0
    rate = getattr(getattr(kv_cache, "counters", None), "cache_hit_rate", None)
    if isinstance(rate, int | float):
        section["cache_hit_rate_since_start"] = float(rate)
    return section


def compute_report(
    records: Sequence[RequestRecord],
    *,
    num_failed: int = 0,
    peak_gpu_memory_bytes: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> BenchmarkReport:
    """Turn per-request records into a :class:`BenchmarkReport`."""
    if records:
        duration = max(r.end_time for r in records) - min(r.submit_time for r in records)
    else:
        duration = 0.0
    total_in = sum(r.input_tokens for r in records)
    total_out = sum(r.output_tokens or 0 for r in records)

    def rate(count: float) -> float:
        return count / duration if duration > 0 else 0.0

    ttfts = [t for r in records if (t := r.ttft) is not None]
    tpots = [t for r in records if (t := r.tpot) is not None]
    itls = [gap for r in records for gap in r.inter_token_latencies]
    return BenchmarkReport(
        num_requests=len(records),
        num_failed=num_failed,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        duration_s=duration,
        request_throughput=rate(len(records)),
        output_throughput=rate(total_out),
        total_token_throughput=rate(total_in + total_out),
        ttft_ms=Stats.of(ttfts, _MS),
        tpot_ms=Stats.of(tpots, _MS),
        itl_ms=Stats.of(itls, _MS),
        e2e_latency_ms=Stats.of([r.e2e_latency for r in records], _MS),
        peak_gpu_memory_bytes=peak_gpu_memory_bytes,
        metadata=dict(metadata or {}),
    )


def reset_peak_gpu_memory(device: Any = None) -> None:
    """Reset CUDA's peak-memory counter of ``device`` (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and (device is None or getattr(device, "type", str(device)).startswith("cuda")):
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory_bytes(device: Any = None) -> int | None:
    """``torch.cuda.max_memory_allocated(device)``, or None without CUDA or on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    if device is not None and not getattr(device, "type", str(device)).startswith("cuda"):
        return None
    return int(torch.cuda.max_memory_allocated(device))
