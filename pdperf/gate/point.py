"""The verdict on a measured point: failures, SLOs, the baseline gate, and when a sweep should stop.

A point whose failed requests exceed its workload's error budget (default 0) is *errored*: it
fails, its first line says how many requests failed and why, and it gets no performance
verdict, because the survivors of a failing server are not a sample of its speed (a point
with 49 of 60 requests failed once passed the gate on its 11 survivors). A point passes when
every SLO holds and the baseline gate finds no regression. A gate that
cannot judge (no baseline for this hardware, a different hardware fingerprint, too few
samples) is not a pass and not a failure: the test says why it could not compare. Sweeps
stop after the SLO failed at N consecutive points (default 2): higher load will not help,
and GPU time is what users pay for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdperf.gate.thresholds import Thresholds
from pdperf.gate.verdicts import Confirmation, GateResult, gate_point
from pdperf.network import kv_failures
from pdperf.results import PointResult, SloResult
from pdperf.waiting import poll_until

RESTART_FLAG = "replica_restart_during_load"
# How long after a point with failed requests a replica restart is still counted as its own: Ray Serve
# replaces a replica after 3 consecutive failed health checks (REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD;
# Ray Serve LLM checks every 10 s with a 10 s timeout), and a point whose requests all fail at once ends
# well before that. Measured on the CPU stack: SIGKILL of the prefill engine, restart seen within 25 s of
# the point's end; of the decode engine, not within 25 s (its point ended 6 s after the kill).
RESTART_SETTLE_S = 60.0
# Endpoint.details key: a shorter settle window for an endpoint whose failures kill no replica (the fault
# proxy of pdperf.inject answers 503 itself: waiting a minute after each of its points finds nothing)
RESTART_SETTLE_KEY = "restart_settle_s"


@dataclass
class PointVerdict:
    """Everything decided about one measured point: failures, SLOs, the gate; carried to the report."""

    test_id: str
    slo_failures: list[str] = field(default_factory=list)
    slo: list[SloResult] = field(default_factory=list)
    gate: GateResult | None = None
    flags: list[str] = field(default_factory=list)
    requests: int = 0
    failed: int = 0
    error_budget: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    kv_problems: list[str] = field(default_factory=list)  # failed transfers, expired leases, the wrong transport

    @property
    def gate_status(self) -> str | None:
        return self.gate.status if self.gate else None

    @property
    def errored(self) -> bool:
        """More requests failed than the error budget allows (any failure, with the default budget of 0)."""
        return self.failed > self.error_budget * self.requests

    def error_message(self) -> str | None:
        """``49 of 60 requests failed (error budget 0): 48 http_5xx (HTTP 503: ...); 1 stream (...)``."""
        if not self.failed:
            return None
        causes = "; ".join(f"{n} {kind}" + (f" ({self.error_examples[kind][:160]})" if kind in self.error_examples else "")
                           for kind, n in sorted(self.errors.items(), key=lambda kv: -kv[1]))
        budget = f"error budget {self.error_budget:g}" + (f" = {int(self.error_budget * self.requests)} requests"
                                                          if self.error_budget else "")
        text = f"{self.failed} of {self.requests} requests failed ({budget}): {causes}"
        restarts = [f.split(":", 1)[1] for f in self.flags if f.startswith(RESTART_FLAG + ":")]
        if restarts:
            text += f"; a serving replica restarted during the point ({restarts[0]} restart(s): an engine died)"
        return text

    def failure_message(self) -> str | None:
        parts = []
        if self.errored:
            parts.append(f"errored, no performance verdict: {self.error_message()}")
        if self.kv_problems:
            parts.append("KV path: " + "; ".join(self.kv_problems))
        if self.slo_failures:
            parts.append("SLO missed: " + "; ".join(self.slo_failures))
        if self.gate and self.gate.status == "regressed":
            parts.append("baseline gate: " + self.gate.message())
        return " | ".join(parts) or None

    def skip_message(self) -> str | None:
        if self.errored:
            return None
        if self.gate and self.gate.status in ("incomparable", "missing", "insufficient"):
            return f"SLOs met; baseline gate not applied: {self.gate.message()}"
        return None


def restarts_during_point(restarts: Callable[[], int], before: int, *, failed: int, settle_s: float,
                          interval_s: float = 1.0) -> int:
    """Replica restarts a point touched (its ``replica_restart_during_load`` flag): those seen by its end,
    or, when it had failed requests and none was seen, the first that shows within ``settle_s`` after it.
    Counting at the end alone misses the restart that failed the requests: the point ends before Serve's
    health check replaces the dead replica, and the next point is measured on the replaced one."""
    n = restarts() - before
    if n > 0 or failed <= 0 or settle_s <= 0:
        return n
    try:
        return poll_until(lambda: (restarts() - before) or None, what="a replica restart after failed requests",
                          timeout_s=settle_s, interval_s=interval_s, max_interval_s=interval_s)
    except TimeoutError:
        return 0


def slo_failures(result: PointResult) -> list[str]:
    out = []
    for s in result.summary.slos:
        if not s.passed:
            if s.observed is not None:
                out.append(f"{s.slo} observed {s.observed:.1f}")
            elif s.failed_requests:
                out.append(f"{s.slo} (unbounded: {s.failed_requests} failed requests reach the percentile)")
            else:
                out.append(f"{s.slo} (no samples)")
    return out


def judge(result: PointResult, *, test_id: str, baselines_root: Path, thresholds: Thresholds,
          gate: bool = True, remeasure: Callable[[int], PointResult] | None = None,
          confirm_attempts: int = 0) -> PointVerdict:
    """SLOs of ``result``, and (``gate``) the baseline gate; a regression is confirmed by
    re-measuring when ``remeasure`` is given (confirm_regression). The SLOs judge the first
    measurement alone. An errored point (failed requests over its error budget) is not gated."""
    s = result.summary
    v = PointVerdict(test_id=test_id, slo=list(s.slos), flags=list(result.flags), requests=s.requests,
                     failed=s.requests_failed, error_budget=s.error_budget, errors=dict(s.errors),
                     error_examples=dict(s.error_examples))
    v.slo_failures = slo_failures(result)
    v.kv_problems = kv_failures(result.telemetry) + (
        [result.telemetry.kv_path_problem] if result.telemetry.kv_path_problem else [])
    if gate and not v.errored:
        v.gate = gate_point(baselines_root, result, thresholds)
        if remeasure is not None:
            v.gate = confirm_regression(v.gate, remeasure, lambda again: gate_point(baselines_root, again, thresholds),
                                        confirm_attempts)
    return v


class SweepTracker:
    """Consecutive SLO failures per (topology, workload): tells a sweep when to stop."""

    def __init__(self) -> None:
        self._fails: dict[tuple[str, str], list[str]] = {}

    def record(self, topology: str, workload: str, point_id: str, slo_ok: bool) -> None:
        key = (topology, workload)
        if slo_ok:
            self._fails[key] = []
        else:
            self._fails.setdefault(key, []).append(point_id)

    def stop_reason(self, topology: str, workload: str, limit: int) -> str | None:
        fails = self._fails.get((topology, workload), [])
        if limit and len(fails) >= limit:
            return (f"sweep stopped: SLO missed at {len(fails)} consecutive points ({', '.join(fails)}); "
                    "higher load points would only miss it further")
        return None


def confirm_regression(gate: GateResult, remeasure: Callable[[int], PointResult],
                       regate: Callable[[PointResult], GateResult], attempts: int) -> GateResult:
    """Re-measure a regressed point up to ``attempts`` times; the regression stands only if every
    re-measurement regresses too.

    Why: a point's speed moves between runs by more than its requests' spread says. On 4x H100
    (eager, Ray Serve LLM) the same deployment measured twice, minutes apart, gave TPOT p50 22.2
    and 18.9 ms at c4 (x0.85, p = 4e-6 over requests): in the first run a third of the requests
    decoded at 33 ms per token instead of 20, with GPU clocks at their maximum throughout. Had the
    runs come the other way round, unchanged code would have failed the gate. A real regression
    repeats; such a slow stretch rarely does. The first measurement stays the point's result;
    each re-measurement's gate is kept in ``gate.confirmations``. A re-measurement that does not
    regress ends the loop with status "unconfirmed" (the test passes and the report says so).
    ``remeasure(k)`` measures attempt k (1-based) and saves it; an error in it propagates, and what
    was already measured stays saved.
    """
    if gate.status != "regressed" or attempts <= 0:
        return gate
    for k in range(1, attempts + 1):
        again = remeasure(k)
        g = regate(again)
        gate.confirmations.append(Confirmation(attempt=k, status=g.status, message=g.message(),
                                               started_at=again.started_at))
        if g.status != "regressed":
            gate.status = "unconfirmed"
            break
    return gate


@dataclass
class VerdictRecord:
    """One test's outcome as verdicts.json and the report keep it: the point(s) it measured, the
    SLOs, the gate, and why it failed or was skipped. The pytest plugin builds it from a test's
    :class:`PointVerdict`; pytest-xdist workers send it to the controller as JSON."""

    test_id: str
    outcome: str  # passed | failed | skipped
    reason: str = ""
    points: list[str] = field(default_factory=list)
    slo: list[SloResult] = field(default_factory=list)
    gate: GateResult | None = None
    errored: str | None = None  # "N of M requests failed: ..." when the point had no performance verdict
    baseline_written: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"test_id": self.test_id, "outcome": self.outcome, "reason": self.reason, "points": list(self.points),
                "slo": [s.model_dump() for s in self.slo], "gate": self.gate.to_dict() if self.gate else None,
                "errored": self.errored, "baseline_written": list(self.baseline_written)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerdictRecord:
        gate = d.get("gate")
        return cls(test_id=str(d.get("test_id", "")), outcome=str(d.get("outcome", "")), reason=str(d.get("reason") or ""),
                   points=list(d.get("points") or []), slo=[SloResult.model_validate(s) for s in d.get("slo") or []],
                   gate=GateResult.from_dict(gate) if isinstance(gate, dict) else None, errored=d.get("errored"),
                   baseline_written=list(d.get("baseline_written") or []))
