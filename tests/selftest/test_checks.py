"""Verdicts on a point: SLO failures read from a real summary, and when a sweep stops.

Summaries come from ``pdperf.metrics.summarize`` over synthetic request records (not hand-written
dicts), so a change to the summary's shape breaks these tests rather than the sweep tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdperf.checks import SweepTracker, judge, slo_failures
from pdperf.metrics import summarize
from pdperf.results import PointResult, RequestRecord
from pdperf.specs import SLO

pytestmark = pytest.mark.selftest


def record(i: int, ttft_ms: float, *, tokens: int = 4, gap_ms: float = 10.0, error: str | None = None) -> RequestRecord:
    start = float(i)
    if error:
        return RequestRecord(index=i, scheduled_s=start, sent_s=start, error=error, error_detail="stub")
    first = start + ttft_ms / 1000.0
    chunks = [first + k * gap_ms / 1000.0 for k in range(tokens)]
    return RequestRecord(index=i, scheduled_s=start, sent_s=start, first_token_s=first, end_s=chunks[-1],
                         chunk_times_s=chunks, chunk_tokens=[1] * tokens, input_tokens=8, output_tokens=tokens)


def point(records: list[RequestRecord], slos: list[str]) -> PointResult:
    summary = summarize(records, duration_s=10.0, gpus=0, slos=[SLO.parse(s) for s in slos])
    return PointResult(topology="cpu-pd-1p1-1d1", workload="cpu-latency", point_id="c2", sweep_kind="concurrency",
                       point_value=2, gpus=0, started_at="2026-01-01T00:00:00Z", duration_s=10.0, records=records,
                       summary=summary)


def test_met_slos_give_no_failures():
    result = point([record(i, 200.0) for i in range(10)], ["p99_ttft_ms <= 500", "p99_tpot_ms <= 50"])
    assert slo_failures(result) == []


def test_missed_slo_names_the_slo_and_the_observed_value():
    result = point([record(i, 200.0) for i in range(10)], ["p99_ttft_ms <= 150", "p99_tpot_ms <= 50"])
    assert slo_failures(result) == ["p99_ttft_ms <= 150 observed 200.0"]


def test_slo_with_no_samples_is_a_failure():
    result = point([record(i, 0, error="http_5xx") for i in range(3)], ["p99_ttft_ms <= 500"])
    assert slo_failures(result) == ["p99_ttft_ms <= 500 (no samples)"]


def test_no_slos_no_failures():
    assert slo_failures(point([record(0, 100.0)], [])) == []


def test_verdict_messages_without_the_gate():
    failing = point([record(i, 200.0) for i in range(5)], ["p99_ttft_ms <= 150"])
    v = judge(failing, test_id="t", baselines_root=Path("/nonexistent"), thresholds=None, gate=False)  # type: ignore[arg-type]
    assert v.failure_message() == "SLO missed: p99_ttft_ms <= 150 observed 200.0"
    assert v.gate is None and v.skip_message() is None
    passing = point([record(i, 100.0) for i in range(5)], ["p99_ttft_ms <= 150"])
    v = judge(passing, test_id="t", baselines_root=Path("/nonexistent"), thresholds=None, gate=False)  # type: ignore[arg-type]
    assert v.failure_message() is None


# -- SweepTracker ------------------------------------------------------------------------------

def test_sweep_stops_after_two_consecutive_misses():
    tracker = SweepTracker()
    tracker.record("topo", "wl", "c1", slo_ok=False)
    assert tracker.stop_reason("topo", "wl", limit=2) is None
    tracker.record("topo", "wl", "c2", slo_ok=False)
    reason = tracker.stop_reason("topo", "wl", limit=2)
    assert reason is not None
    assert "2 consecutive points (c1, c2)" in reason


def test_a_pass_resets_the_count():
    tracker = SweepTracker()
    for point_id, ok in (("c1", False), ("c2", True), ("c4", False)):
        tracker.record("topo", "wl", point_id, slo_ok=ok)
    assert tracker.stop_reason("topo", "wl", limit=2) is None
    tracker.record("topo", "wl", "c8", slo_ok=False)
    assert "(c4, c8)" in tracker.stop_reason("topo", "wl", limit=2)


def test_sweeps_are_tracked_per_topology_and_workload():
    tracker = SweepTracker()
    for point_id in ("c1", "c2"):
        tracker.record("topo", "wl", point_id, slo_ok=False)
    assert tracker.stop_reason("topo", "other-wl", limit=2) is None
    assert tracker.stop_reason("other-topo", "wl", limit=2) is None


def test_limit_zero_never_stops_and_a_higher_limit_waits():
    tracker = SweepTracker()
    for point_id in ("c1", "c2"):
        tracker.record("topo", "wl", point_id, slo_ok=False)
    assert tracker.stop_reason("topo", "wl", limit=0) is None
    assert tracker.stop_reason("topo", "wl", limit=3) is None
    tracker.record("topo", "wl", "c4", slo_ok=False)
    assert tracker.stop_reason("topo", "wl", limit=3) is not None
