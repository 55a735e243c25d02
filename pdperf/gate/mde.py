"""Minimum detectable regression (MDE): the smallest slowdown the gate catches at a point.

Why: a gate that cannot fire is not a gate. The rule (:mod:`pdperf.gate.verdicts`) flags a
statistic only when the change is significant *and* beyond its limit, measured from the worst
run of the point's band; how small a change that lets through depends on the point's requests,
its spread within a run and between runs, and the limit. This module says, per point and gated
statistic, the smallest relative slowdown ``s`` the gate flags as ``regressed`` with probability
``power`` (95 %), and how often it flags unchanged code (s = 0).

Method: a power analysis by simulation that runs the gate's own arithmetic.

1. *A current run* is drawn by resampling the baseline's first run, as many values as a new run
   of the point gives the gate: its requests for per-request metrics (TTFT, TPOT, E2E); for
   per-gap metrics (ITL, chunk gaps), which the gate judges per request, whole requests: each
   draw picks requests from ``request_stats`` (a request's statistic of its own gaps, so its gaps
   stay together), and the pooled statistic of the drawn run is the baseline's, scaled by the
   drawn requests' mean per-request value over the baseline's (the store keeps no gap-by-gap
   record per request). A gate that sees more than 5000 values sees 5000 (``even_subsample``):
   5000 are drawn.
2. *Between runs*, the draw is multiplied by a lognormal factor centred on the band's runs (mean
   of their log statistic) with the spread between runs that the band shows beyond what resampling
   one run already gives: ``sigma_between^2 = sigma_band^2 - sigma_within^2`` (``sigma_band``: the
   standard deviation of log statistic over the band's runs; ``sigma_within``: that of the drawn
   runs, scaled to the band runs' request count). A baseline of one run holds no spread between
   deployments: the factor is 1 and the MDE is optimistic (``why`` says ``no band: optimistic``).
   A band of two runs gives a rough spread (one degree of freedom).
3. *The slowdown*: every value of the drawn run is multiplied by ``1 + s``.
4. *The gate*: Mann-Whitney p < alpha (:func:`pdperf.stats.mann_whitney_u`'s normal approximation
   with tie correction), the seeded bootstrap interval of the ratio entirely above 1 (the same
   seed, resample count and level as :func:`pdperf.stats.bootstrap_ratio_ci`), and the ratio to
   the band's worst run beyond ``1 + max_change``: ``judge_metric``'s rule, evaluated for every
   draw at once. A drawn run is handed over in sorted order, which lets one bootstrap index
   matrix serve all draws (``judge_metric`` on the same sorted arrays gives the same interval:
   ``GateSimulation.judge`` calls it, and tests/selftest/test_mde.py holds the two together).
5. *The search*: each draw's verdict is monotone in ``s`` (the same draws serve every ``s``), so
   the bisection for the smallest ``s`` that at least ``power`` of the draws flag reduces to each
   draw's own threshold (a bisection on the Mann-Whitney statistic, closed forms for the interval
   and the size) and their ``power`` quantile. Not reached below ``max_mde`` (+300 %): None.

``why``: ``limit-bound`` (the MDE is within a tenth of the limit above it, at least one point: the
noise is small and the limit is what decides), ``noise-bound`` (the excess over the limit comes
mostly from one run's noise: the significance tests with too few requests for the spread within a
run, or the statistic's own sampling spread against the size rule: more requests help),
``spread-bound`` (it comes mostly from the band: its worst run above its centre and the spread
between runs: find why deployments differ), ``insufficient`` (the gate cannot judge the statistic
at this request count, e.g. a p50 of 16 requests against ``min_samples`` 30), plus ``no band:
optimistic`` for a baseline of one run. ``false_alarm``: the share of draws flagged at s = 0, per
measurement (a re-measurement on the same deployment shares its between-run factor).

Speed: 300 draws of a point of 128 requests take a few tens of milliseconds per statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from pdperf import metrics
from pdperf.gate.store import BaselineEntry, load_baseline
from pdperf.gate.thresholds import Gate, ResolvedThresholds, Thresholds
from pdperf.gate.verdicts import MetricVerdict, judge_metric
from pdperf.results import PointResult
from pdperf.stats import DEFAULT_SAMPLE_CAP, even_subsample, mann_whitney_u, parse_statistic, statistic_value

#: Detection probability the MDE is defined at.
POWER = 0.95
#: Simulated runs per point and statistic.
DRAWS = 300
#: Slowdowns beyond this are "not reachable" (mde None).
MAX_MDE = 3.0
#: The change users ask the gate to catch (issue 20): a point that cannot is warned about.
TARGET_CHANGE = 0.10
#: What the report shows per gated point: TPOT p50, TTFT p50 and the throughput proxy.
REPORT_GATES = ("p50 tpot_ms", "p50 ttft_ms", "mean e2e_ms")
#: Bisection steps on log(c) for the Mann-Whitney threshold (a relative precision of ~1e-8).
_BISECT_STEPS = 28
_LIMIT_BOUND_TOLERANCE = 0.10  # MDE within limit * (1 + this) (at least +1 point): "limit-bound"


@dataclass(frozen=True)
class Mde:
    """The minimum detectable regression of one gated statistic of one point."""

    metric: str
    statistic: str
    mde: float | None  # relative slowdown (0.15 = +15 %) flagged with probability >= power; None: not reachable
    false_alarm: float | None  # share of simulated runs of unchanged code flagged (s = 0)
    draws: int
    band_runs: int  # runs of the band that keep this statistic (1: no band)
    limit: float  # the gate's max_change
    why: str
    requests: int = 0  # requests of the new run the simulation assumed
    samples: int = 0  # samples the gate sees of the metric (pooled gaps for per-gap metrics, capped)
    between_run_sigma: float = 0.0  # lognormal sigma of the between-run factor
    power: float = POWER
    detail: str = ""

    @property
    def key(self) -> str:
        return f"{self.statistic} {self.metric}"

    def text(self) -> str:
        """``+17%`` or ``-`` (not reachable / not judged)."""
        return "-" if self.mde is None else f"+{self.mde * 100:.0f}%"

    def catches(self, change: float) -> bool:
        """Whether a slowdown of ``change`` (0.10 = +10 %) is flagged with probability >= power."""
        return self.mde is not None and self.mde <= change

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["key"] = self.key
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mde:
        return cls(**{k: v for k, v in d.items() if k != "key"})


def throughput_drop(e2e_increase: float) -> float:
    """At fixed concurrency throughput = concurrency / mean E2E (Little's law): a mean E2E
    ``+e2e_increase`` is a throughput drop of ``1 - 1 / (1 + e2e_increase)``."""
    return 1.0 - 1.0 / (1.0 + e2e_increase)


def e2e_increase_for_throughput_drop(drop: float) -> float:
    """The mean E2E increase a throughput drop of ``drop`` is (0.10 -> 0.111)."""
    return 1.0 / (1.0 - drop) - 1.0


#: Why the E2E mean gate is the throughput gate (docs/METHODOLOGY.md, "Known limits").
LITTLE_NOTE = "at fixed concurrency throughput = concurrency / mean E2E (Little's law)"


def mde_warnings(mdes: Iterable[Mde], *, sweep_kind: str = "concurrency", target: float = TARGET_CHANGE) -> list[str]:
    """Lines for a point that cannot catch a ``target`` regression of TPOT p50 or of throughput
    (through its proxy, E2E mean: ``LITTLE_NOTE``)."""
    by_key = {m.key: m for m in mdes}
    pct = f"{target * 100:.0f}%"
    out = []
    tpot = by_key.get("p50 tpot_ms")
    if tpot is not None and not tpot.catches(target):
        out.append(f"cannot catch a {pct} regression of TPOT p50 ({_mde_words(tpot)})")
    e2e = by_key.get("mean e2e_ms")
    need = e2e_increase_for_throughput_drop(target)
    if e2e is not None and not e2e.catches(need):
        if sweep_kind != "concurrency":
            out.append(f"cannot catch E2E mean +{need * 100:.1f}% ({_mde_words(e2e)}); a rate sweep's throughput "
                       "is its offered rate below saturation, so E2E mean is a latency gate here")
        else:
            drop = f", throughput -{throughput_drop(e2e.mde) * 100:.0f}%" if e2e.mde is not None else ""
            out.append(f"cannot catch a {pct} throughput drop (E2E mean {_mde_words(e2e)}{drop}; "
                       f"{LITTLE_NOTE}, so a {pct} drop is E2E mean +{need * 100:.1f}%)")
    return out


def _mde_words(m: Mde) -> str:
    if m.mde is None:
        return f"not gated: {m.why}" if m.why.startswith("insufficient") else m.why
    return f"MDE {m.text()}, {m.why}"


# --------------------------------------------------------------------------- the simulation


def _tie_term(values: np.ndarray) -> float:
    """sum(t^3 - t) over groups of equal values (Mann-Whitney's tie correction)."""
    _, counts = np.unique(values, return_counts=True)
    c = counts.astype(float)
    return float(np.sum(c ** 3 - c))


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """numpy's percentile interpolation, as numpy computes it (``_lerp``)."""
    diff = b - a
    out: np.ndarray = (b - diff * (1 - t)) if t >= 0.5 else (a + diff * t)
    return out


class GateSimulation:
    """Simulated current runs of one point against its baseline, judged by one gate.

    ``requests``: the new run's requests (default: the baseline's); ``output_tokens``: its OSL, for
    the gaps of per-gap metrics (default: the baseline's gaps per request).
    """

    def __init__(self, entry: BaselineEntry, gate: Gate, *, alpha: float, ci_level: float, resamples: int,
                 requests: int | None = None, output_tokens: int | None = None, draws: int = DRAWS,
                 seed: int = 0, max_mde: float = MAX_MDE, cap: int = DEFAULT_SAMPLE_CAP) -> None:
        self.gate, self.alpha, self.ci_level, self.resamples = gate, alpha, ci_level, resamples
        self.draws, self.seed, self.max_mde, self.cap = draws, seed, max_mde, cap
        self.metric, self.statistic = gate.metric, gate.statistic
        self.base = np.asarray(entry.samples.get(gate.metric, []), dtype=float)
        per_gap = gate.metric in metrics.PER_GAP_METRICS
        req = (entry.request_stats.get(gate.metric) or {}).get(gate.statistic) if per_gap else None
        self.per_request = req is not None
        dist = entry.summary.metrics.get(gate.metric)
        base_n = dist.n if dist is not None and dist.n else len(self.base)
        if self.per_request:
            self.pool = np.asarray(req, dtype=float)
            base_requests = len(self.pool)
            self.requests = requests or base_requests
            per = (output_tokens - 1) if output_tokens else base_n / max(base_requests, 1)
            self.samples = min(int(round(self.requests * per)), cap)
            self.n_draw = self.requests
        else:
            self.pool = self.base
            if per_gap:  # a baseline without per-request values: pooled gaps (optimistic p-values)
                base_requests = entry.summary.requests_ok or 1
                self.requests = requests or base_requests
                per = (output_tokens - 1) if output_tokens else base_n / base_requests
                n = int(round(self.requests * per))
            else:
                base_requests = base_n
                self.requests = requests or base_n
                n = self.requests
            self.samples = min(n, cap)
            self.n_draw = self.samples
        self.base_requests = base_requests
        self.limit = gate.max_change
        band = entry.band(gate.metric, gate.statistic)
        self.band = band if band and len(band) >= 2 and min(band) > 0 else None
        self.band_runs = len(self.band) if self.band else 1
        self.sigma_within = self.sigma_band = self.sigma_between = self.sigma_centre = self.mu = 0.0
        self.why_not: str | None = self._cannot_judge(per_gap)
        if self.why_not is None:
            self._simulate()

    # ------------------------------------------------------------------ setup

    def _cannot_judge(self, per_gap: bool) -> str | None:
        need = self.gate.min_samples or 2
        if self.gate.direction != "lower-is-better":
            return f"insufficient: {self.gate.direction} metrics are not simulated"
        if not len(self.base):
            return f"insufficient: the baseline keeps no {self.metric} samples (re-record it)"
        unit = "gaps" if per_gap else "samples"
        if self.samples < need:
            return f"insufficient: {self.samples} {unit} a run, the gate needs {need}"
        if len(self.base) < need:
            return (f"insufficient: the baseline holds {len(self.base)} {unit}, the gate needs {need} "
                    "(record it with more requests)")
        if not len(self.pool):
            return f"insufficient: the baseline has no per-request {self.statistic} of {self.metric}"
        self.base_value = statistic_value(self.base, self.statistic)
        if self.base_value <= 0:
            return f"insufficient: baseline {self.statistic} is {self.base_value:g}, a relative change is undefined"
        return None

    def _simulate(self) -> None:
        rng = np.random.default_rng(self.seed)
        idx = rng.integers(0, len(self.pool), size=(self.draws, self.n_draw))
        self.x = np.sort(self.pool[idx], axis=1)  # each draw handed to the gate sorted (module docstring, 4)
        self.z = rng.standard_normal(self.draws)
        if self.per_request:
            pool_mean = float(np.mean(self.pool))
            scale = self.x.mean(axis=1) / pool_mean if pool_mean > 0 else np.ones(self.draws)
            self.value = self.base_value * scale  # the drawn run's pooled statistic
        else:
            q = parse_statistic(self.statistic)
            self.value = self.x.mean(axis=1) if q is None else np.percentile(self.x, q, axis=1)
        self.worst = max(self.band) if self.band else self.base_value
        # between runs: lognormal around the band's runs, with their spread beyond one run's resampling,
        # and the uncertainty of that centre (the band's mean of k runs; one run's own sampling error)
        positive = self.value[self.value > 0]
        within = float(np.std(np.log(positive), ddof=1)) if len(positive) > 2 else 0.0
        within_base = within * math.sqrt(self.requests / max(self.base_requests, 1))  # at the band runs' requests
        self.sigma_within = within
        if self.band:
            logs = np.log(np.asarray(self.band, dtype=float))
            self.sigma_band = float(np.std(logs, ddof=1))
            self.sigma_between = math.sqrt(max(self.sigma_band ** 2 - within_base ** 2, 0.0))
            self.sigma_centre = self.sigma_band / math.sqrt(len(logs))
            self.mu = float(np.mean(logs) - logs[0])
        else:
            self.sigma_centre = within_base
        self.factor = np.exp(self.mu + math.hypot(self.sigma_between, self.sigma_centre) * self.z)
        self.ci_low = self._ci_low()
        # per draw, the scale c at which each condition starts to hold: the interval above 1, the size
        # beyond the limit from the band's worst run, and (bisection) Mann-Whitney
        has_ci, positive_value = self.ci_low > 0, self.value > 0
        self.c_ci = np.where(has_ci, 1.0 / np.where(has_ci, self.ci_low, 1.0), np.inf)
        self.c_size = np.where(positive_value, (1 + self.limit) * self.worst / np.where(positive_value, self.value, 1.0),
                               np.inf)
        self.c_star = self._mw_threshold(np.maximum(self.c_ci, self.c_size))

    def _ci_low(self) -> np.ndarray:
        """Per draw: the lower end of the gate's bootstrap interval of the ratio at scale 1 (0: no
        interval). :func:`pdperf.stats.bootstrap_ratio_ci` on the sorted draw, for all draws at once:
        the same seed and index matrices; the interval at scale c is c times this one."""
        statistic = "p50" if self.per_request else self.statistic
        n = self.n_draw
        base = even_subsample(self.pool, self.cap)
        if n < 10 or len(base) < 10:
            return np.zeros(self.draws)
        rng = np.random.default_rng(0)  # judge_metric's seed
        cur_idx = rng.integers(0, n, size=(self.resamples, n))
        base_idx = rng.integers(0, len(base), size=(self.resamples, len(base)))
        q = parse_statistic(statistic)
        base_rows = base[base_idx]
        base_stats = base_rows.mean(axis=1) if q is None else np.percentile(base_rows, q, axis=1)
        if np.any(base_stats == 0):
            return np.zeros(self.draws)
        if q is None:
            counts = np.bincount((cur_idx + np.arange(self.resamples)[:, None] * n).ravel(),
                                 minlength=self.resamples * n).reshape(self.resamples, n).astype(float)
            cur_stats = self.x @ counts.T / n
        else:
            ordered = np.sort(cur_idx, axis=1)
            h = (n - 1) * (q / 100.0)
            lo = int(math.floor(h))
            hi = min(lo + 1, n - 1)
            cur_stats = _lerp(self.x[:, ordered[:, lo]], self.x[:, ordered[:, hi]], h - lo)
        ratios = cur_stats / base_stats[None, :]
        low: np.ndarray = np.percentile(ratios, (1 - self.ci_level) / 2 * 100, axis=1)
        return low

    def _mw_threshold(self, start: np.ndarray) -> np.ndarray:
        """Per draw: the smallest scale c >= ``start`` at which Mann-Whitney of c * draw against the
        baseline gives p < alpha upward (inf when none below ``max_mde``): a bisection on log c of
        U(c), the count of baseline values below each scaled current value (the tie correction of
        ties within each side; ties across sides only happen at isolated c)."""
        y = np.sort(self.pool)
        n_x, n_y = self.n_draw, len(y)
        n = n_x + n_y
        tie_y = _tie_term(y)
        tie = np.array([_tie_term(row) for row in self.x]) + tie_y
        var = n_x * n_y / 12.0 * ((n + 1) - tie / (n * (n - 1)))
        z = NormalDist().inv_cdf(1 - self.alpha / 2)
        u_crit = n_x * n_y / 2.0 + 0.5 + z * np.sqrt(np.maximum(var, 0.0))
        out = np.full(self.draws, np.inf)
        cap = (1 + self.max_mde) * float(np.max(self.factor)) * 1.01
        rows = np.flatnonzero(np.isfinite(start) & (start <= cap) & (var > 0))

        def u_at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            scaled = self.x[r] * c[:, None]
            u: np.ndarray = np.searchsorted(y, scaled.ravel(), side="left").reshape(scaled.shape).sum(axis=1)
            return u

        if not len(rows):
            return out
        lo = start[rows] * (1 + 1e-12)
        done = u_at(rows, lo) > u_crit[rows]
        out[rows[done]] = start[rows[done]]
        rows, lo = rows[~done], lo[~done]
        if not len(rows):
            return out
        hi = np.full(len(rows), cap)
        ok = u_at(rows, hi) > u_crit[rows]
        rows, lo, hi = rows[ok], np.log(lo[ok]), np.log(hi[ok])
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            above = u_at(rows, np.exp(mid)) > u_crit[rows]
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid)
        out[rows] = np.exp(hi)
        return out

    # ------------------------------------------------------------------ results

    def thresholds(self) -> np.ndarray:
        """Per draw: the smallest slowdown s at which the gate flags it (inf: none below the cap)."""
        s: np.ndarray = self.c_star / self.factor - 1.0
        return s

    def detected(self, s: float) -> np.ndarray:
        """Per draw: flagged ``regressed`` at slowdown ``s``, each condition evaluated directly
        (Mann-Whitney by :func:`pdperf.stats.mann_whitney_u` itself, ties included)."""
        c = self.factor * (1 + s)
        flagged: np.ndarray = (c * self.ci_low > 1) & (c * self.value / self.worst > 1 + self.limit)
        for j in np.flatnonzero(flagged):
            flagged[j] = mann_whitney_u(self.x[j] * c[j], self.pool).p_value < self.alpha
        return flagged

    def current_run(self, draw: int, s: float) -> tuple[np.ndarray, np.ndarray | None]:
        """The arrays the gate would be handed for draw ``draw`` at slowdown ``s``: the current
        samples and (per-request judging) the current per-request values."""
        c = float(self.factor[draw] * (1 + s))
        if not self.per_request:
            return self.x[draw] * c, None
        pooled = even_subsample(self.base, self.samples) if self.samples < len(self.base) else self.base
        return pooled * (self.value[draw] / self.base_value) * c, self.x[draw] * c

    def judge(self, draw: int, s: float) -> MetricVerdict:
        """``judge_metric`` itself on draw ``draw`` at slowdown ``s`` (what the gate would say)."""
        current, current_requests = self.current_run(draw, s)
        return judge_metric(self.gate, current, self.base, alpha=self.alpha, ci_level=self.ci_level,
                            resamples=self.resamples, current_requests=current_requests,
                            baseline_requests=self.pool if self.per_request else None, band=self.band)

    def result(self, power: float = POWER) -> Mde:
        """The MDE at ``power``, the false-alarm rate at s = 0, and why the MDE is what it is."""
        def make(mde: float | None, false_alarm: float | None, why: str, detail: str = "") -> Mde:
            return Mde(metric=self.metric, statistic=self.statistic, mde=mde, false_alarm=false_alarm,
                       draws=self.draws, band_runs=self.band_runs, limit=self.limit, why=why, requests=self.requests,
                       samples=self.samples, between_run_sigma=self.sigma_between, power=power,
                       detail=detail)

        if self.why_not is not None:
            return make(None, None, self.why_not)
        k = max(1, math.ceil(power * self.draws))
        found = float(np.sort(self.thresholds())[k - 1])
        size_only = float(np.sort(self.c_size / self.factor - 1.0)[k - 1])
        false_alarm = float(np.mean(self.detected(0.0)))
        band_text = (f"band of {self.band_runs} runs {min(self.band):.4g}-{max(self.band):.4g}, worst "
                     f"x{self.worst / self.base_value:.3f} of the first" if self.band
                     else "one run: no spread between runs known")
        detail = (f"{'per request' if self.per_request else 'samples'}: {self.n_draw} a run; {band_text}; "
                  f"sigma of the statistic within a run {self.sigma_within:.3f}, between runs {self.sigma_between:.3f}, "
                  f"of the centre {self.sigma_centre:.3f}; "
                  f"size rule alone {size_only * 100:+.1f}%")
        suffix = "" if self.band else "; no band: optimistic"
        if not math.isfinite(found) or found > self.max_mde:
            return make(None, false_alarm, f"noise-bound: not reached below +{self.max_mde * 100:.0f}%{suffix}",
                        detail)
        if found <= self.limit + max(0.01, _LIMIT_BOUND_TOLERANCE * self.limit):
            return make(max(found, 0.0), false_alarm, "limit-bound" + suffix, detail)
        # where the excess over the limit comes from: one run's noise (the significance tests, and the
        # statistic's sampling spread against the size rule) or the band (its worst run above its
        # centre, the spread between runs)
        with np.errstate(divide="ignore"):
            within_only = float(np.sort((1 + self.limit) * self.base_value / self.value - 1.0)[k - 1])
        noise_part = max(found - size_only, 0.0) + max(within_only - self.limit, 0.0)
        spread_part = max(size_only - within_only, 0.0)
        why = "spread-bound" if spread_part > noise_part else "noise-bound"
        return make(found, false_alarm, why + suffix, detail)


def gate_mde(entry: BaselineEntry, gate: Gate, thresholds: ResolvedThresholds, *, requests: int | None = None,
             output_tokens: int | None = None, draws: int = DRAWS, power: float = POWER, seed: int = 0,
             max_mde: float = MAX_MDE) -> Mde:
    """The MDE of one gated statistic of one baseline point (the module docstring has the method)."""
    sim = GateSimulation(entry, gate, alpha=thresholds.alpha, ci_level=thresholds.ci_level,
                         resamples=thresholds.bootstrap_resamples, requests=requests, output_tokens=output_tokens,
                         draws=draws, seed=seed, max_mde=max_mde)
    return sim.result(power)


def point_mdes(entry: BaselineEntry, thresholds: Thresholds | ResolvedThresholds, *,
               keys: Sequence[str] | None = None, requests: int | None = None, output_tokens: int | None = None,
               draws: int = DRAWS, power: float = POWER, seed: int = 0) -> list[Mde]:
    """The MDE of every gate that applies to the point's hardware (``keys``: only those, e.g.
    ``REPORT_GATES``), in the thresholds' order."""
    resolved = thresholds.resolve(entry.environment.hardware_id) if isinstance(thresholds, Thresholds) else thresholds
    gates = [g for g in resolved.gates if keys is None or g.key in keys]
    return [gate_mde(entry, g, resolved, requests=requests, output_tokens=output_tokens, draws=draws, power=power,
                     seed=seed) for g in gates]


def result_mdes(root: Path, result: PointResult, thresholds: Thresholds, *,
                keys: Sequence[str] | None = None) -> list[Mde] | None:
    """The MDE of a measured point's gates against its stored baseline, at the point's own request
    count; None when it has no active baseline (the gate did not run)."""
    hw = result.environment.hardware_id
    if hw is None:
        return None
    baseline = load_baseline(root, hw, result.topology, result.workload, result.environment.backend)
    entry = baseline.entry(result.point_id) if baseline is not None and not baseline.retired else None
    if entry is None:
        return None
    return point_mdes(entry, thresholds.resolve(hw), keys=keys, requests=result.summary.requests_ok or None)
