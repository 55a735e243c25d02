"""The regression gate: is this point slower than its baseline on this hardware?

The rule (docs/METHODOLOGY.md, "Regression gate"): a metric regresses only when the change is
both statistically significant (Mann-Whitney p < alpha and the bootstrap ratio interval
excludes 1) and larger than a per-metric, direction-aware limit (pdperf.gate.thresholds).
Per-token metrics (ITL, chunk gaps) are judged for significance per request (one value per
request, that request's statistic of its gaps), since the gaps of one request move together:
pooled as independent samples they made a 17 % move between two runs of unchanged code look
certain (4x H100, PD c1: p = 8e-193). With a band of two or more recorded runs, a change's size
is measured from the band's worst (best) run. A baseline of other hardware or another backend
is never used, and a retired one (history only) neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pdperf import metrics
from pdperf.gate.store import BaselineEntry, load_baseline
from pdperf.gate.thresholds import Gate, ResolvedThresholds, Thresholds
from pdperf.results import Environment, PointResult
from pdperf.stats import (
    bootstrap_ratio_ci,
    even_subsample,
    format_p_value,
    format_value,
    mann_whitney_u,
    statistic_value,
)

Verdict = Literal["regressed", "improved", "unchanged", "insufficient"]
#: Overall statuses: the verdicts, plus "incomparable" (other hardware), "missing" (no baseline)
#: and "unconfirmed" (regressed, then not in a re-measurement: pdperf.gate.point.confirm_regression).
STATUSES = ("regressed", "improved", "unchanged", "insufficient", "incomparable", "missing", "unconfirmed")


def _limit_text(gate_direction: str, max_change: float, bad: bool) -> str:
    """'+50%' for the bad side of lower-is-better, '-33%' for its mirror, and so on."""
    up = (gate_direction == "lower-is-better") == bad
    return f"+{max_change * 100:.0f}%" if up else f"-{(1 - 1 / (1 + max_change)) * 100:.0f}%"


@dataclass
class MetricVerdict:
    """The gate's finding on one statistic of one metric."""

    metric: str
    statistic: str
    direction: str
    verdict: str
    reason: str
    baseline_value: float | None = None
    current_value: float | None = None
    ratio: float | None = None
    ratio_ci: tuple[float, float] | None = None
    p_value: float | None = None
    threshold: float | None = None  # max_change
    n_baseline: int = 0
    n_current: int = 0
    unit: str = ""
    # per-token metrics judged per request: how many requests each side had (None: pooled gaps)
    requests_current: int | None = None
    requests_baseline: int | None = None
    # ... and the ratio of the median request's value, the one the interval is about (the
    # pooled ratio above can lie outside it: at c64 a few requests' tails move the pooled p99)
    request_ratio: float | None = None
    # the baseline's band (two or more recorded runs): the statistic's range over them and how
    # many; the verdict's size was then measured from the band's worst (or best) run
    band_low: float | None = None
    band_high: float | None = None
    band_runs: int | None = None

    @property
    def key(self) -> str:
        return f"{self.statistic} {self.metric}"

    def message(self) -> str:
        """``p99 tpot_ms 14.1 -> 29.8 ms (x2.11, CI 1.9-2.3, p=1e-12) exceeds +50%: regressed``."""
        head = f"{self.statistic} {self.metric}"
        if self.ratio is None:
            return f"{head}: {self.reason}: {self.verdict}"
        unit = f" {self.unit}" if self.unit else ""
        ci = f", CI {self.ratio_ci[0]:.3g}-{self.ratio_ci[1]:.3g}" if self.ratio_ci else ", CI n/a"
        if self.request_ratio is not None:
            ci = f"; median request x{self.request_ratio:.2f}{ci}"
        p = format_p_value(self.p_value)
        per = (f", over {self.requests_current}/{self.requests_baseline} requests"
               if self.requests_current is not None else "")
        if self.band_runs:
            per += f"; {self.band_runs} baseline runs {format_value(self.band_low)}-{format_value(self.band_high)}"
        return (f"{head} {format_value(self.baseline_value)} -> {format_value(self.current_value)}{unit} "
                f"(x{self.ratio:.2f}{ci}, p{'' if p.startswith('<') else '='}{p}{per}) {self.reason}: {self.verdict}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_ci"] = list(self.ratio_ci) if self.ratio_ci else None
        d["message"] = self.message()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricVerdict:
        d = {k: v for k, v in d.items() if k != "message"}
        if d.get("ratio_ci") is not None:
            d["ratio_ci"] = tuple(d["ratio_ci"])
        return cls(**d)


@dataclass
class Confirmation:
    """One re-measurement of a regressed point and the gate's status on it."""

    attempt: int
    status: str
    message: str
    started_at: str = ""
    point_file: str | None = None  # where the re-measurement was saved, relative to the run folder


@dataclass
class GateResult:
    """The baseline gate's finding on one point: an overall status and a verdict per gated metric."""

    point: str
    status: str
    verdicts: list[MetricVerdict] = field(default_factory=list)
    reason: str = ""
    hardware_id: str | None = None
    baseline_hardware_id: str | None = None
    thresholds_source: str = ""
    notes: list[str] = field(default_factory=list)
    # Re-measurements of a regressed point (pdperf.gate.point.confirm_regression); empty when none was made.
    confirmations: list[Confirmation] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.status == "regressed"

    def message(self) -> str:
        """One line for a human: the regressed (or improved) metrics, or why nothing was compared."""
        if self.status == "unconfirmed":  # the first measurement's verdicts say "regressed"
            parts = "; ".join(v.message() for v in self.verdicts if v.verdict == "regressed")
            last = self.confirmations[-1] if self.confirmations else None
            return (f"{self.point}: unconfirmed: the first measurement regressed ({parts}), "
                    f"re-measurement {last.attempt if last else '?'} did not ({last.status if last else '?'}): "
                    "the point's own run-to-run spread, not a regression shown twice")
        if self.status in ("regressed", "improved"):
            text = f"{self.point}: " + "; ".join(v.message() for v in self.verdicts if v.verdict == self.status)
            if self.confirmations:
                n = len(self.confirmations)
                text += f" (confirmed by {n} re-measurement{'s' if n != 1 else ''})"
            return text
        if self.status == "unchanged":
            n = sum(1 for v in self.verdicts if v.verdict == "unchanged")
            return f"{self.point}: unchanged ({n} of {len(self.verdicts)} gated metrics within limits)"
        return f"{self.point}: {self.status}: {self.reason}"

    __str__ = message

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "status": self.status, "message": self.message(), "reason": self.reason,
                "hardware_id": self.hardware_id, "baseline_hardware_id": self.baseline_hardware_id,
                "thresholds_source": self.thresholds_source, "notes": list(self.notes),
                "verdicts": [v.to_dict() for v in self.verdicts],
                "confirmations": [asdict(c) for c in self.confirmations]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        return cls(point=d["point"], status=d["status"], reason=d.get("reason", ""),
                   hardware_id=d.get("hardware_id"), baseline_hardware_id=d.get("baseline_hardware_id"),
                   thresholds_source=d.get("thresholds_source", ""), notes=list(d.get("notes", [])),
                   verdicts=[MetricVerdict.from_dict(v) for v in d.get("verdicts", [])],
                   confirmations=[Confirmation(**c) for c in d.get("confirmations", [])])


def _env_differences(current_env: Environment, baseline_env: Environment, limit: int = 8) -> list[str]:
    """``key old -> new`` per differing scalar key; a key absent on one side (as ``co_resident``
    of a point measured alone) or empty reads ``(none)``, and absent equals empty."""
    current, baseline = current_env.scalars(), baseline_env.scalars()
    diffs = []
    for key in sorted(set(current) | set(baseline)):
        a, b = baseline.get(key), current.get(key)
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or a == b:
            continue
        if a in (None, "") and b in (None, ""):
            continue
        diffs.append(f"{key} {_shown(a)} -> {_shown(b)}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... {len(diffs) - limit} more"]
    return diffs


def _shown(value: Any) -> Any:
    return "(none)" if value in (None, "") else value


def judge_metric(gate: Gate, current: np.ndarray, baseline: np.ndarray, *, alpha: float, ci_level: float,
                 resamples: int, seed: int = 0, current_requests: np.ndarray | None = None,
                 baseline_requests: np.ndarray | None = None, band: list[float] | None = None) -> MetricVerdict:
    """Apply one gate to two sample sets (the rule is in the module docstring).

    ``current_requests`` / ``baseline_requests`` (per-token metrics): one value per request, the
    gate's statistic of that request's gaps. Given both, the size of the change is still the ratio
    of the pooled statistic, but its significance comes from them: Mann-Whitney over requests, and
    the interval of the ratio of the median request's value, resampling requests (that ratio is
    kept as ``request_ratio`` and printed beside the interval it belongs to).

    ``band``: the statistic in each of the baseline's recorded runs (two or more). The limit is
    then applied to the current value against the band's worst run (regressed) and best run
    (improved): a move within the spread already seen between deployments of the same code is
    not a change. ``ratio`` stays the one against ``baseline`` (the first run).
    """
    unit = metrics.UNITS.get(gate.metric, "")
    common: dict[str, Any] = dict(metric=gate.metric, statistic=gate.statistic, direction=gate.direction, threshold=gate.max_change,
                  n_baseline=int(len(baseline)), n_current=int(len(current)), unit=unit)
    need = gate.min_samples or 2
    if len(current) < need or len(baseline) < need:
        return MetricVerdict(verdict="insufficient", reason=f"{len(current)} current / {len(baseline)} baseline "
                             f"samples, needs {need} on each side", **common)
    base_value = statistic_value(baseline, gate.statistic)
    cur_value = statistic_value(current, gate.statistic)
    if base_value <= 0:
        return MetricVerdict(verdict="insufficient", baseline_value=base_value, current_value=cur_value,
                             reason=f"baseline {gate.statistic} is {base_value:g}, so a relative change is undefined",
                             **common)
    ratio = cur_value / base_value
    per_request = current_requests is not None and baseline_requests is not None
    if per_request:
        cur_req, base_req = np.asarray(current_requests, dtype=float), np.asarray(baseline_requests, dtype=float)
        p = mann_whitney_u(cur_req, base_req).p_value if len(cur_req) and len(base_req) else 1.0
        ci = bootstrap_ratio_ci(cur_req, base_req, "p50", resamples=resamples, level=ci_level, seed=seed)
        base_median = float(np.median(base_req)) if len(base_req) else 0.0
        common.update(requests_current=int(len(cur_req)), requests_baseline=int(len(base_req)),
                      request_ratio=(float(np.median(cur_req)) / base_median) if base_median > 0 and len(cur_req)
                      else None)
    else:
        p = mann_whitney_u(current, baseline).p_value
        ci = bootstrap_ratio_ci(current, baseline, gate.statistic, resamples=resamples, level=ci_level, seed=seed)
    up_sig = p < alpha and ci is not None and ci[0] > 1
    down_sig = p < alpha and ci is not None and ci[1] < 1
    hi, lo = 1 + gate.max_change, 1 / (1 + gate.max_change)
    lower_better = gate.direction == "lower-is-better"
    worst = best = base_value
    band = band if band and len(band) >= 2 and min(band) > 0 else None
    banded = band is not None
    if band is not None:
        worst, best = (max(band), min(band)) if lower_better else (min(band), max(band))
        common.update(band_low=float(min(band)), band_high=float(max(band)), band_runs=len(band))
    bad_ratio, good_ratio = cur_value / worst, cur_value / best
    bad_large = bad_ratio > hi if lower_better else bad_ratio < lo
    good_large = good_ratio < lo if lower_better else good_ratio > hi
    bad_sig = up_sig if lower_better else down_sig
    good_sig = down_sig if lower_better else up_sig
    of_band = f" of the worst run (x{bad_ratio:.2f})" if banded else ""
    of_best = f" of the best run (x{good_ratio:.2f})" if banded else ""
    bad_limit = _limit_text(gate.direction, gate.max_change, bad=True) + of_band
    good_limit = _limit_text(gate.direction, gate.max_change, bad=False) + of_best
    if bad_large and bad_sig:
        verdict, reason = "regressed", f"exceeds {bad_limit}"
    elif good_large and good_sig:
        verdict, reason = "improved", f"beyond {good_limit}"
    elif bad_large or good_large:
        verdict = "unchanged"
        reason = (f"beyond {bad_limit if bad_large else good_limit} but not significant "
                  f"(needs p < {alpha:g} and a CI that excludes 1)")
    else:
        verdict = "unchanged"
        reason = f"within {bad_limit}" + (" (significant but small)" if (up_sig or down_sig) else "")
    return MetricVerdict(verdict=verdict, reason=reason, baseline_value=base_value, current_value=cur_value,
                         ratio=ratio, ratio_ci=ci, p_value=p, **common)


def _overall(verdicts: list[MetricVerdict]) -> str:
    kinds = {v.verdict for v in verdicts}
    if "regressed" in kinds:
        return "regressed"
    if "improved" in kinds:
        return "improved"
    if not verdicts or kinds == {"insufficient"}:
        return "insufficient"
    return "unchanged"


def compare_samples(point: str, current: dict[str, np.ndarray], baseline: dict[str, Any],
                    thresholds: ResolvedThresholds, *, current_requests: dict[str, dict[str, Any]] | None = None,
                    baseline_requests: dict[str, dict[str, Any]] | None = None,
                    bands: dict[str, list[float]] | None = None) -> list[MetricVerdict]:
    """Verdicts of every gate in ``thresholds`` on per-metric sample sets.

    ``*_requests``: ``{metric: {statistic: per-request values}}`` for per-token metrics (see
    judge_metric); a gate whose statistic either side lacks judges the pooled gaps.
    ``bands``: per gate key (``"p50 tpot_ms"``) the statistic in each recorded baseline run.
    """
    out = []
    for gate in thresholds.gates:
        if gate.metric not in baseline:
            out.append(MetricVerdict(gate.metric, gate.statistic, gate.direction, "insufficient",
                                     f"the baseline of {point} has no {gate.metric} samples; re-record it with "
                                     "--update-baselines", threshold=gate.max_change))
            continue
        cur = even_subsample(np.asarray(current.get(gate.metric, []), dtype=float))
        base = np.asarray(baseline[gate.metric], dtype=float)
        out.append(judge_metric(gate, cur, base, alpha=thresholds.alpha, ci_level=thresholds.ci_level,
                                resamples=thresholds.bootstrap_resamples,
                                current_requests=((current_requests or {}).get(gate.metric) or {}).get(gate.statistic),
                                baseline_requests=((baseline_requests or {}).get(gate.metric) or {}).get(gate.statistic),
                                band=(bands or {}).get(gate.key)))
    return out


def compare_point(current: PointResult, baseline_entry: BaselineEntry | None, baseline_env: Environment,
                  thresholds: Thresholds | ResolvedThresholds, *, allow_cross_hardware: bool = False) -> GateResult:
    """Gate one point against its baseline entry (a ``points[point_id]`` value of a baseline file).

    Status "incomparable" when the hardware_id or the backend differs (unless
    ``allow_cross_hardware``, for ad-hoc comparisons), "missing" when there is no entry; otherwise the worst verdict.
    """
    hw = current.environment.hardware_id
    base_hw = baseline_env.hardware_id
    resolved = thresholds.resolve(hw) if isinstance(thresholds, Thresholds) else thresholds
    result = GateResult(point=current.id, status="unchanged", hardware_id=hw, baseline_hardware_id=base_hw,
                        thresholds_source=resolved.source)
    if baseline_entry is None:
        result.status = "missing"
        result.reason = (f"no baseline for {current.id} on hardware '{hw}'; record one with --update-baselines "
                         "(or --record-missing-baselines: only points that have none)")
        return result
    backend, base_backend = current.environment.backend, baseline_env.backend
    mismatches = [  # (differs, why, what to do instead)
        (hw is None or base_hw is None or hw != base_hw,
         f"hardware differs: current '{hw or 'unknown'}', baseline '{base_hw or 'unknown'}'; baselines compare "
         "only within one hardware_id", "record a baseline on this hardware with --update-baselines"),
        (bool(backend and base_backend and backend != base_backend),
         f"backend differs: current '{backend}', baseline '{base_backend}'; a baseline gates only the backend "
         "that recorded it", "compare the two runs with `pdperf compare` instead"),
    ]
    for differs, reason, instead in mismatches:
        if not differs:
            continue
        if not allow_cross_hardware:
            result.status = "incomparable"
            result.reason = f"{reason} ({instead})"
            return result
        result.notes.append(reason)
    result.notes.extend(f"environment differs: {d}" for d in _env_differences(current.environment, baseline_env))
    if current.flags:
        result.notes.append(f"current point flagged: {', '.join(current.flags)}")
    if baseline_entry.flags:
        result.notes.append(f"baseline point was flagged: {', '.join(baseline_entry.flags)}")
    gated = {g.metric for g in resolved.gates}
    samples = {m: metrics.samples(current.records, m) for m in gated}
    per_gap = [g for g in resolved.gates if g.metric in metrics.PER_GAP_METRICS]
    current_requests: dict[str, dict[str, np.ndarray]] = {}
    for g in per_gap:
        current_requests.setdefault(g.metric, {})[g.statistic] = metrics.per_request_values(current.records, g.metric,
                                                                                             g.statistic)
    baseline_requests = baseline_entry.request_stats
    pooled = sorted({g.key for g in per_gap if g.statistic not in (baseline_requests.get(g.metric) or {})})
    if pooled:
        result.notes.append(f"the baseline keeps no per-request values for {', '.join(pooled)} (recorded before "
                            "they were kept): judged on pooled gaps, whose p-values are optimistic; "
                            "re-record it with --update-baselines")
    bands = {g.key: b for g in resolved.gates if (b := baseline_entry.band(g.metric, g.statistic))}
    runs = len(baseline_entry.runs)
    if runs > 1:
        unbanded = sorted(g.key for g in resolved.gates if g.key not in bands)
        result.notes.append(f"baseline band of {runs} runs: limits apply from its worst (best) run"
                            + (f"; not for {', '.join(unbanded)} (a statistic the runs do not keep)" if unbanded
                               else ""))
    result.verdicts = compare_samples(current.id, samples, baseline_entry.samples, resolved,
                                      current_requests=current_requests, baseline_requests=baseline_requests,
                                      bands=bands)
    result.status = _overall(result.verdicts)
    if result.status == "insufficient":
        result.reason = "; ".join(v.message() for v in result.verdicts[:2])
    return result


def gate_point(root: Path, current: PointResult, thresholds: Thresholds) -> GateResult:
    """Load the baseline of ``current``'s hardware, topology and workload and gate the point against it."""
    hw = current.environment.hardware_id
    if hw is None:
        return GateResult(point=current.id, status="incomparable",
                          reason="the point's environment has no 'hardware_id', so no baseline can match it")
    baseline = load_baseline(root, hw, current.topology, current.workload, current.environment.backend)
    if baseline is None:
        return compare_point(current, None, Environment(hardware_id=hw), thresholds)
    if baseline.retired:
        result = compare_point(current, None, Environment(hardware_id=hw), thresholds)
        result.reason = (f"the baseline {baseline.path} is retired ({baseline.retired}) and kept as history only; "
                         "record this hardware's baseline with --update-baselines (or --record-missing-baselines)")
        return result
    return compare_point(current, baseline.entry(current.point_id), baseline.environment_of(current.point_id),
                         thresholds)
