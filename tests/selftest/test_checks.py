"""Verdicts on a point: SLO failures read from a real summary, and when a sweep stops.

Summaries come from ``pdperf.metrics.summarize`` over synthetic request records (not hand-written
dicts), so a change to the summary's shape breaks these tests rather than the sweep tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdperf.gate import GateResult, SweepTracker, judge, load_thresholds, slo_failures, write_baseline
from pdperf.gate.point import VerdictRecord
from pdperf.metrics import summarize
from pdperf.network import kv_bandwidth_gb_s, kv_bandwidth_note
from pdperf.results import Environment, PointResult, RequestRecord, Telemetry
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


def test_slo_with_only_failed_requests_is_a_failure():
    result = point([record(i, 0, error="http_5xx") for i in range(3)], ["p99_ttft_ms <= 500"])
    assert slo_failures(result) == ["p99_ttft_ms <= 500 (unbounded: 3 failed requests reach the percentile)"]


def test_slo_with_no_requests_is_a_failure():
    assert slo_failures(point([], ["p99_ttft_ms <= 500"])) == ["p99_ttft_ms <= 500 (no samples)"]


def test_slo_counts_failed_requests_as_missing_it():
    """The issue-24 case: 11 fast survivors of 60 must not meet a p99 SLO."""
    records = [record(i, 100.0) for i in range(11)] + [record(11 + i, 0, error="http_5xx") for i in range(49)]
    assert slo_failures(point(records, ["p99_ttft_ms <= 5000"])) == [
        "p99_ttft_ms <= 5000 (unbounded: 49 failed requests reach the percentile)"]
    # one failure in 200 stays below p99's tail: the percentile of the rest, failure included as +inf
    records = [record(i, 100.0 + i) for i in range(199)] + [record(199, 0, error="timeout")]
    s = point(records, ["p99_ttft_ms <= 5000"]).summary.slos[0]
    # 200 samples, the last +inf: p99 sits at index 197.01, between the two slowest survivors
    assert s.passed and s.observed == pytest.approx(100.0 + 197 + 0.01)


def errored_point(failed: int, total: int = 60, budget: float = 0.0, flags: list[str] | None = None,
                  slo: str = "p99_ttft_ms <= 5000") -> PointResult:
    records = [record(i, 100.0) for i in range(total - failed)]
    records += [RequestRecord(index=total - failed + i, scheduled_s=0.0, sent_s=0.0, error="http_5xx",
                              error_detail="HTTP 503: Service Unavailable") for i in range(failed - 1)]
    if failed:
        records.append(RequestRecord(index=total - 1, scheduled_s=0.0, sent_s=0.0, error="stream",
                                     error_detail="connection dropped mid-stream"))
    r = point(records, [slo])
    r.summary.error_budget = budget
    r.flags = list(flags or [])
    return r


def test_point_with_failed_requests_is_errored_and_not_gated(tmp_path):
    v = judge(errored_point(49, flags=["replica_restart_during_load:1"]), test_id="t", baselines_root=tmp_path,
              thresholds=load_thresholds(), gate=True)
    assert v.errored and v.gate is None and v.skip_message() is None
    msg = v.failure_message()
    assert msg.startswith("errored, no performance verdict: 49 of 60 requests failed (error budget 0): "
                          "48 http_5xx (HTTP 503: Service Unavailable); 1 stream (connection dropped mid-stream)")
    assert "a serving replica restarted during the point (1 restart(s)" in msg


def test_one_failed_request_errors_a_point_by_default(tmp_path):
    v = judge(errored_point(1), test_id="t", baselines_root=tmp_path, thresholds=load_thresholds(), gate=False)
    assert v.errored and "1 of 60 requests failed" in v.failure_message()


def test_error_budget_admits_failures_up_to_it(tmp_path):
    """Within the budget the point is judged, its failures still counted in every SLO's percentile:
    3 failures of 60 miss a p99 SLO (they are its tail), not a p90 one."""
    within = judge(errored_point(3, budget=0.05, slo="p90_ttft_ms <= 5000"), test_id="t", baselines_root=tmp_path,
                   thresholds=load_thresholds(), gate=False)
    assert not within.errored and within.failure_message() is None
    p99 = judge(errored_point(3, budget=0.05), test_id="t", baselines_root=tmp_path,
                thresholds=load_thresholds(), gate=False)
    assert not p99.errored and p99.failure_message().startswith("SLO missed: p99_ttft_ms <= 5000 (unbounded")
    assert within.error_message().startswith("3 of 60 requests failed (error budget 0.05 = 3 requests)")
    over = judge(errored_point(4, budget=0.05), test_id="t", baselines_root=tmp_path,
                 thresholds=load_thresholds(), gate=False)
    assert over.errored


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


# --------------------------------------------------------------------------- confirmation
# The gate is real (baselines on disk, the real thresholds); what stands in is the measuring:
# a list of prepared points handed out one per re-measurement (FakeRemeasure), since a slow
# stretch that comes and goes cannot be produced on demand (tests/smoke has the real stack's
# confirmed case).

def gated_point(gap_ms: float, *, started_at: str = "2026-01-01T00:00:00Z") -> PointResult:
    rng = np.random.default_rng(int(gap_ms * 10))
    records = [record(i, 100.0 * float(np.exp(rng.normal(0, 0.05))), tokens=40,
                      gap_ms=gap_ms * float(np.exp(rng.normal(0, 0.05)))) for i in range(40)]
    p = point(records, [])
    p.started_at = started_at
    p.environment = Environment(hardware_id="cpu-test")
    return p


class FakeRemeasure:
    """Hands out prepared points as re-measurements, recording which attempts were asked for."""

    def __init__(self, *points: PointResult) -> None:
        self.points, self.attempts = list(points), []

    def __call__(self, attempt: int) -> PointResult:
        self.attempts.append(attempt)
        return self.points[attempt - 1]


@pytest.fixture
def slow_vs_fast(tmp_path: Path):
    write_baseline(tmp_path, [gated_point(10.0)])
    return tmp_path, load_thresholds()


def run_judge(root: Path, thresholds, first: PointResult, fake: FakeRemeasure | None, attempts: int = 1):
    return judge(first, test_id="t", baselines_root=root, thresholds=thresholds, remeasure=fake,
                 confirm_attempts=attempts)


def test_a_regression_that_repeats_fails(slow_vs_fast):
    root, thresholds = slow_vs_fast
    fake = FakeRemeasure(gated_point(30.0, started_at="later"))
    v = run_judge(root, thresholds, gated_point(30.0), fake)
    assert v.gate.status == "regressed" and fake.attempts == [1]
    assert v.gate.confirmations[0].status == "regressed" and v.gate.confirmations[0].started_at == "later"
    assert "confirmed by 1 re-measurement" in v.failure_message()


def test_a_regression_that_does_not_repeat_passes_as_unconfirmed(slow_vs_fast):
    root, thresholds = slow_vs_fast
    fake = FakeRemeasure(gated_point(10.2), gated_point(30.0))
    v = run_judge(root, thresholds, gated_point(30.0), fake, attempts=2)
    assert v.gate.status == "unconfirmed" and fake.attempts == [1]  # the first clean re-measurement ends it
    assert v.failure_message() is None and v.skip_message() is None
    msg = v.gate.message()
    assert "unconfirmed: the first measurement regressed (p50 tpot_ms 9.96 -> 29.9 ms" in msg
    assert "re-measurement 1 did not (unchanged)" in msg
    again = GateResult.from_dict(json.loads(json.dumps(v.gate.to_dict())))
    assert again.status == "unconfirmed" and again.confirmations == v.gate.confirmations


def test_every_re_measurement_must_regress(slow_vs_fast):
    root, thresholds = slow_vs_fast
    fake = FakeRemeasure(gated_point(30.0), gated_point(10.0))
    v = run_judge(root, thresholds, gated_point(30.0), fake, attempts=2)
    assert v.gate.status == "unconfirmed" and fake.attempts == [1, 2]
    assert [c.status for c in v.gate.confirmations] == ["regressed", "unchanged"]


@pytest.mark.parametrize("gap_ms, attempts", [(10.0, 1), (30.0, 0)])
def test_no_re_measurement_unless_regressed_and_asked(slow_vs_fast, gap_ms, attempts):
    root, thresholds = slow_vs_fast
    fake = FakeRemeasure()
    v = run_judge(root, thresholds, gated_point(gap_ms), fake, attempts=attempts)
    assert fake.attempts == [] and v.gate.confirmations == []
    assert v.gate.status == ("unchanged" if gap_ms == 10.0 else "regressed")


def test_an_error_while_re_measuring_propagates(slow_vs_fast):
    root, thresholds = slow_vs_fast

    def broken(attempt: int) -> PointResult:
        raise RuntimeError("the endpoint went away")

    with pytest.raises(RuntimeError, match="went away"):
        run_judge(root, thresholds, gated_point(30.0), broken)


def test_the_terminal_summary_names_unconfirmed_points(slow_vs_fast):
    from fixtures.reporting import unconfirmed_lines

    root, thresholds = slow_vs_fast
    v = run_judge(root, thresholds, gated_point(30.0), FakeRemeasure(gated_point(10.1)))
    verdicts = [VerdictRecord("a", "passed", gate=v.gate), VerdictRecord("b", "passed"),
                VerdictRecord("c", "passed", gate=GateResult(point="x", status="unchanged"))]
    [line] = unconfirmed_lines(verdicts)
    assert line.startswith("  unconfirmed (passed): cpu-pd-1p1-1d1/cpu-latency/c2: unconfirmed: the first measurement")


def test_kv_bandwidth_and_the_range_an_estimated_transfer_time_proves():
    exact = Telemetry(kv_bytes=8e9, kv_transfers=100, kv_transfer_time_s=0.01)
    assert kv_bandwidth_gb_s(exact) == pytest.approx(8.0) and kv_bandwidth_note(exact) == ""
    # through Ray: 0.0075-0.01 s buckets, the midpoint 0.00875 s; 80 MB per transfer
    ray = exact.model_copy(update={"kv_transfer_time_s": 0.00875, "estimated_means": ["kv_transfer_time_s"],
                                   "mean_bounds_s": {"kv_transfer_time_s": [0.0075, 0.01]}})
    assert kv_bandwidth_gb_s(ray) == pytest.approx(8 / 0.875)
    assert kv_bandwidth_note(ray) == (" (estimated: the transfer time comes from Ray's histogram buckets, which "
                                      "prove only 8.00 to 10.67 GB/s)")
    open_ended = ray.model_copy(update={"mean_bounds_s": {"kv_transfer_time_s": [0.0, None]}})
    assert kv_bandwidth_note(open_ended).endswith("prove only at least 0 GB/s)")


@pytest.mark.parametrize(("time_bounds", "bytes_bounds", "verdict"), [
    ((0.025, 0.05), (2 ** 27, 2 ** 29), "pass"),       # GPT-OSS ISL 5000 at ~10 GB/s: proven >= 2.7 GB/s
    ((5.0, None), (2 ** 27, 2 ** 29), "fail"),          # the study's TCP fallback: seconds per transfer
    ((0.1, 0.2), (2 ** 25, 2 ** 27), "inconclusive"),  # 0.17-1.3 GB/s straddles 1 GB/s
])
def test_kv_bandwidth_floor_is_judged_on_what_the_buckets_prove(time_bounds, bytes_bounds, verdict):
    from pdperf.network import kv_bandwidth_floor

    lo, hi = time_bounds
    mid_t = (lo + hi) / 2 if hi else lo * 2
    tel = Telemetry(kv_transfers=10, kv_transfer_time_s=mid_t, kv_bytes_per_transfer=sum(bytes_bounds) / 2,
                    estimated_means=["kv_transfer_time_s", "kv_bytes_per_transfer"],
                    mean_bounds_s={"kv_transfer_time_s": [lo, hi], "kv_bytes_per_transfer": list(bytes_bounds)})
    got, why = kv_bandwidth_floor(tel, 1.0)
    assert got == verdict, why
    assert "Ray's histogram buckets" in why
    exact = Telemetry(kv_transfers=10, kv_transfer_time_s=0.5, kv_bytes_per_transfer=4e8)  # 0.8 GB/s, exact
    assert kv_bandwidth_floor(exact, 1.0)[0] == "fail"
    assert kv_bandwidth_floor(Telemetry(), 1.0)[0] == "fail"
