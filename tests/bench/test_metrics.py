"""Benchmark metrics on hand-made timing records with exactly known results."""

from __future__ import annotations

import json

import pytest

from rtllm.bench.metrics import (
    RequestRecord,
    Stats,
    compute_report,
    peak_gpu_memory_bytes,
    percentile,
)


def test_percentile_interpolates_linearly():
    values = [float(v) for v in range(101, 0, -1)]  # 101..1, unsorted on purpose
    assert percentile(values, 50) == 51.0
    assert percentile(values, 90) == 91.0
    assert percentile(values, 99) == 100.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_of():
    stats = Stats.of([1.0, 2.0, 3.0, 4.0], scale=1000.0)
    assert stats.mean == pytest.approx(2500.0)
    assert stats.p50 == pytest.approx(2500.0)
    assert stats.count == 4
    assert Stats.of([]) is None


def test_record_ttft_tpot_itl():
    r = RequestRecord(submit_time=10.0, end_time=17.0, token_times=[11.0, 12.0, 14.0, 17.0], input_tokens=5)
    assert r.first_token_time == 11.0 and r.output_tokens == 4
    assert r.ttft == 1.0
    assert r.tpot == 2.0  # (17 - 11) / 3
    assert r.inter_token_latencies == [1.0, 2.0, 3.0]
    assert r.e2e_latency == 7.0
    single = RequestRecord(submit_time=0.0, end_time=1.0, token_times=[0.5])
    assert single.ttft == 0.5 and single.tpot is None and single.inter_token_latencies == []
    empty = RequestRecord(submit_time=0.0, end_time=1.0)
    assert empty.ttft is None and empty.tpot is None and empty.output_tokens == 0


def test_report_exact_figures():
    records = [
        RequestRecord(submit_time=0.0, end_time=1.5, token_times=[0.5, 1.0, 1.5], input_tokens=10),
        RequestRecord(submit_time=0.0, end_time=2.0, token_times=[1.0, 2.0], input_tokens=6),
    ]
    report = compute_report(records, metadata={"mode": "throughput"})
    assert report.num_requests == 2 and report.num_failed == 0
    assert report.total_input_tokens == 16 and report.total_output_tokens == 5
    assert report.duration_s == 2.0
    assert report.request_throughput == pytest.approx(1.0)
    assert report.output_throughput == pytest.approx(2.5)
    assert report.total_token_throughput == pytest.approx(10.5)
    # TTFT [500, 1000] ms
    assert (report.ttft_ms.mean, report.ttft_ms.p50, report.ttft_ms.p90, report.ttft_ms.p99) == pytest.approx(
        (750.0, 750.0, 950.0, 995.0))
    # TPOT: (1.5 - 0.5) / 2 = 0.5 s and (2.0 - 1.0) / 1 = 1.0 s
    assert (report.tpot_ms.mean, report.tpot_ms.p50, report.tpot_ms.p90, report.tpot_ms.p99) == pytest.approx(
        (750.0, 750.0, 950.0, 995.0))
    # ITL: every gap [500, 500, 1000] ms
    assert report.itl_ms.count == 3
    assert (report.itl_ms.mean, report.itl_ms.p50, report.itl_ms.p90, report.itl_ms.p99) == pytest.approx(
        (2000.0 / 3, 500.0, 900.0, 990.0))
    assert (report.e2e_latency_ms.mean, report.e2e_latency_ms.p99) == pytest.approx((1750.0, 1995.0))

    data = report.to_dict()
    json.dumps(data)  # serializable
    assert data["metadata"] == {"mode": "throughput"}
    assert data["ttft_ms"] == {"mean": pytest.approx(750.0), "p50": pytest.approx(750.0),
                               "p90": pytest.approx(950.0), "p99": pytest.approx(995.0), "count": 2}
    assert data["total_output_tokens"] == 5 and data["peak_gpu_memory_bytes"] is None
    table = report.format_table()
    for text in ("rtllm bench throughput", "TTFT", "TPOT", "inter-token", "output throughput", "2.50"):
        assert text in table


def test_report_without_decode_tokens_or_records():
    report = compute_report([RequestRecord(submit_time=0.0, end_time=0.25, token_times=[0.25])], num_failed=1)
    assert report.tpot_ms is None and report.itl_ms is None
    assert report.ttft_ms.mean == pytest.approx(250.0)
    assert report.num_failed == 1
    assert "n/a" in report.format_table() and "1 failed" in report.format_table()
    empty = compute_report([])
    assert empty.duration_s == 0.0 and empty.request_throughput == 0.0 and empty.ttft_ms is None
    assert empty.to_dict()["e2e_latency_ms"] is None


def test_peak_gpu_memory_is_none_on_cpu():
    assert peak_gpu_memory_bytes("cpu") is None
