"""Predictions with their uncertainty, and predicted-vs-measured for one measured point.

Why an interval and not a number: a profile fitted to a few configurations is sure of
what it saw and unsure of what it did not. The interval of a prediction combines two
things the calibration measured:

- parameter uncertainty: the model run with each bootstrap parameter set (fits to the
  calibration points resampled within each configuration);
- model error on configurations the fit never saw: each metric's leave-one-config-out
  log residuals (in-sample ones when there was a single configuration), applied as
  multiplicative errors.

Every (bootstrap set, residual) pair gives one plausible value; the interval is their
central ``level`` quantiles. Points outside what was calibrated (another TP, ISL, load or
placement) are flagged in ``extrapolations``: the interval does not cover that risk.

:func:`predict_for_result` is the report's entry point: one measured ``PointResult`` in,
its prediction, interval and measured values out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdperf.planner.fit import REPORT_METRICS
from pdperf.planner.model import Deployment, Prediction, WorkloadPoint, solve
from pdperf.planner.profiles import MeasuredPoint, ModelParams, PlannerError, Profile, resolve


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float


@dataclass(frozen=True)
class PredictionWithInterval:
    """A point prediction, a ``level`` interval for each reported metric, and where it extrapolates."""

    prediction: Prediction
    level: float
    med_ttft_ms: Interval
    p99_ttft_ms: Interval
    med_tpot_ms: Interval
    out_tok_s: Interval
    extrapolations: tuple[str, ...]
    samples: dict[str, np.ndarray]  # metric -> every plausible value (for goodput / SLO probabilities)

    def interval(self, metric: str) -> Interval:
        return getattr(self, metric)


def predict(profile: Profile | ModelParams, deployment: Deployment, point: WorkloadPoint) -> Prediction:
    """The point prediction of ``deployment`` at ``point``."""
    params = profile.params if isinstance(profile, Profile) else profile
    return solve(resolve(params, deployment), point, deployment)


def extrapolations(profile: Profile, deployment: Deployment, point: WorkloadPoint) -> tuple[str, ...]:
    """Ways in which ``deployment`` at ``point`` lies outside the profile's calibration data."""
    cal = profile.calibration
    if cal is None:
        return ("profile has no calibration record",)
    notes = []
    tps = {deployment.prefill_tp} | ({deployment.decode_tp} if deployment.kind == "pd" else set())
    outside = sorted(t for t in tps if t not in cal.tps)
    if outside:
        notes.append(f"TP {','.join(map(str, outside))} not calibrated (calibrated TPs: {cal.tps})")
    if not (min(cal.isl) <= point.isl <= max(cal.isl)):
        notes.append(f"ISL {point.isl} outside the calibrated {min(cal.isl)}-{max(cal.isl)}")
    if not (min(cal.osl) <= point.osl <= max(cal.osl)):
        notes.append(f"OSL {point.osl} outside the calibrated {min(cal.osl)}-{max(cal.osl)}")
    if point.value > max(cal.loads) * 1.0001 and point.load == "concurrency":
        notes.append(f"concurrency {point.value:g} above the calibrated maximum {max(cal.loads):g}")
    if deployment.placement != "pack" and deployment.kind == "pd":
        notes.append(f"placement '{deployment.placement}': KV bandwidth across nodes is "
                     f"{'measured' if 'telemetry' in profile.params.kv_transfer.source else 'assumed'}")
    return tuple(notes)


def predict_interval(profile: Profile, deployment: Deployment, point: WorkloadPoint, *,
                     level: float = 0.9) -> PredictionWithInterval:
    """The prediction with a ``level`` interval per metric (see the module docstring)."""
    if not 0 < level < 1:
        raise PlannerError(f"interval level {level}: must be between 0 and 1 (e.g. 0.9)")
    base = predict(profile, deployment, point)
    cal = profile.calibration
    sets: Sequence[ModelParams] = cal.bootstrap if cal and cal.bootstrap else [profile.params]
    boot: dict[str, list[float]] = {m: [] for m in REPORT_METRICS}
    for params in sets:
        try:
            p = predict(params, deployment, point)
            for m in REPORT_METRICS:
                boot[m].append(p.metric(m))
        except (ValueError, ZeroDivisionError, OverflowError):
            for m in REPORT_METRICS:
                boot[m].append(math.nan)
    samples: dict[str, np.ndarray] = {}
    intervals: dict[str, Interval] = {}
    q = ((1 - level) / 2, (1 + level) / 2)
    for m in REPORT_METRICS:
        res: list[float] = []
        if cal is not None:
            res = list(cal.loco_log_residuals.get(m) or cal.in_sample_log_residuals.get(m) or [])
        errors = np.exp(np.asarray(res, dtype=float)) if res else np.ones(1)
        values = np.asarray(boot[m], dtype=float)
        values = values[np.isfinite(values)]
        if len(values) == 0 or not math.isfinite(base.metric(m)):
            samples[m] = np.asarray([base.metric(m)])
            intervals[m] = Interval(base.metric(m), base.metric(m))
            continue
        plausible = (values[:, None] * errors[None, :]).ravel()
        samples[m] = plausible
        lo, hi = np.quantile(plausible, q)
        intervals[m] = Interval(float(min(lo, base.metric(m))), float(max(hi, base.metric(m))))
    return PredictionWithInterval(prediction=base, level=level, extrapolations=extrapolations(profile, deployment,
                                                                                             point),
                                  samples=samples, **intervals)


@dataclass(frozen=True)
class PointComparison:
    """One measured point beside the profile's prediction for it (what the HTML report shows)."""

    measured: MeasuredPoint
    predicted: PredictionWithInterval

    def error_pct(self, metric: str) -> float | None:
        """(predicted - measured) / measured in percent; None where the point lacks the metric."""
        meas = self.measured.value(metric)
        pred = self.predicted.prediction.metric(metric)
        if meas is None or meas <= 0 or not math.isfinite(pred):
            return None
        return (pred / meas - 1.0) * 100.0

    def within_interval(self, metric: str) -> bool | None:
        meas = self.measured.value(metric)
        if meas is None:
            return None
        iv = self.predicted.interval(metric)
        return iv.lo <= meas <= iv.hi


def measured_point(result, topology) -> MeasuredPoint:
    """A ``pdperf.results.PointResult`` and its ``pdperf.specs.Topology`` as a MeasuredPoint."""
    from pdperf.network import kv_bandwidth_gb_s

    ok = [r for r in result.records if r.ok and not r.warmup]
    if len(ok) < 2:
        raise PlannerError(f"point {result.id}: {len(ok)} successful requests; at least 2 are needed")
    isl = int(statistics.median(r.input_tokens for r in ok))
    osl = int(statistics.median(r.output_tokens for r in ok))
    summary = result.summary
    stat = summary.stat
    med_ttft, med_tpot = stat("ttft_ms", "p50"), stat("tpot_ms", "p50")
    tok_s = summary.throughput.output_tok_per_s
    if med_ttft is None or med_tpot is None or not tok_s:
        raise PlannerError(f"point {result.id}: no TTFT/TPOT/throughput in its summary; re-run the point")
    if result.sweep_kind == "rate":
        wp = WorkloadPoint(isl, osl, "rate", float(result.point_value))
    else:
        warm = any(r.warmup for r in result.records)
        rps = None if warm else max(int(round(len(ok) / max(result.point_value, 1))), 1)
        wp = WorkloadPoint(isl, osl, "concurrency", float(result.point_value), rps)
    dep = Deployment.from_topology(topology)
    tel = result.telemetry
    pd = topology.kind == "pd"
    bw = kv_bandwidth_gb_s(tel) if pd else None
    # results from before the bytes had their own mean: a Ray point's bytes were midpoints too
    bytes_estimated = "kv_bytes_per_transfer" in tel.estimated_means or (
        tel.kv_bytes_per_transfer is None and "kv_transfer_time_s" in tel.estimated_means)
    return MeasuredPoint(config=result.topology, deployment=dep, point=wp, med_ttft_ms=med_ttft, med_tpot_ms=med_tpot,
                         out_tok_s=float(tok_s), p99_ttft_ms=stat("ttft_ms", "p99"), p99_tpot_ms=stat("tpot_ms", "p99"),
                         requests=len(ok), kv_bandwidth_gb_s=bw,
                         kv_transfer_s=tel.kv_transfer_time_s if pd else None,
                         kv_bytes_estimated=pd and bytes_estimated, source=result.id)


def predict_for_result(profile: Profile, result, topology=None, *, level: float = 0.9) -> PointComparison:
    """The report's entry point: the profile's prediction for one measured ``PointResult``.

    ``topology`` (a ``pdperf.specs.Topology``) defaults to ``topologies/<result.topology>.yaml``.
    """
    if topology is None:
        from pdperf.errors import SpecError
        from pdperf.specs import TOPOLOGY_DIR, load_topology

        try:
            topology = load_topology(TOPOLOGY_DIR / f"{result.topology}.yaml")
        except SpecError as e:
            raise PlannerError(f"point {result.id}: its topology cannot be read ({e}); pass topology=") from None
    mp = measured_point(result, topology)
    return PointComparison(measured=mp, predicted=predict_interval(profile, mp.deployment, mp.point, level=level))
