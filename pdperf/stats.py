"""Statistics for comparing two runs: is a change real, and how large is it?

A perf gate that compares two percentiles alone flags noise: p99 TTFT of 200 requests on
the 2-core CPU stack moved from 39 to 81 ms between two runs of the same client (see
shared FINDINGS). So the baseline gate asks two independent questions of the raw samples:

- *is there a shift at all?* Mann-Whitney U, two-sided, normal approximation with tie
  correction and continuity correction (what ``scipy.stats.mannwhitneyu(method=
  "asymptotic")`` computes; written here with numpy to keep scipy out of the harness);
- *how large is it, with what uncertainty?* a seeded percentile bootstrap of the ratio
  ``statistic(current) / statistic(baseline)`` (e.g. p99 current / p99 baseline), each
  sample set resampled on its own.

Both are deterministic for a given input (fixed seed), so a CI verdict can be reproduced.
Big sample sets are reduced by :func:`even_subsample` (evenly spaced order statistics,
which keeps every quantile to within 1/cap) so a bootstrap of 250 000 ITL samples stays
a fraction of a second.

Known limits, also in docs/METHODOLOGY.md: samples of one request's ITL are not
independent, so p-values on ``itl_ms`` are optimistic (the per-metric threshold is what
keeps that honest); Mann-Whitney sees shifts of the bulk, not of the tail alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

#: Samples kept per metric in a baseline file, and per side in a bootstrap.
DEFAULT_SAMPLE_CAP = 5000

_STAT_RE = re.compile(r"^(?:p(\d+(?:\.\d+)?)|mean)$")


@dataclass(frozen=True)
class MannWhitneyResult:
    """Two-sided Mann-Whitney U test of ``x`` against ``y``.

    ``u_x`` is U of the first sample (the count of pairs where x > y, ties count half);
    ``effect`` is the common-language effect size ``u_x / (n_x * n_y)``: 0.5 is no shift,
    1.0 means every x is larger than every y.
    """

    u_x: float
    z: float
    p_value: float
    n_x: int
    n_y: int

    @property
    def effect(self) -> float:
        return self.u_x / (self.n_x * self.n_y) if self.n_x and self.n_y else 0.5


def rank_average(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n of ``values`` with ties given their average rank, and the tie group sizes."""
    values = np.asarray(values, dtype=float)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    group_rank = ends - (counts - 1) / 2.0
    return group_rank[inverse].astype(float), counts


def mann_whitney_u(x: np.ndarray, y: np.ndarray, *, continuity: bool = True) -> MannWhitneyResult:
    """Two-sided Mann-Whitney U test, normal approximation with tie correction.

    Identical sample sets give p = 1; a set of only one repeated value on both sides
    (zero variance) also gives p = 1, since nothing can be told apart.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    n_x, n_y = len(x), len(y)
    if n_x == 0 or n_y == 0:
        raise ValueError(f"mann_whitney_u needs samples on both sides (got {n_x} and {n_y})")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("mann_whitney_u: samples contain NaN; drop failed requests before testing")
    n = n_x + n_y
    ranks, tie_counts = rank_average(np.concatenate([x, y]))
    u_x = float(ranks[:n_x].sum() - n_x * (n_x + 1) / 2.0)
    mean_u = n_x * n_y / 2.0
    tie_term = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts)) / (n * (n - 1)) if n > 1 else 0.0
    var_u = n_x * n_y / 12.0 * ((n + 1) - tie_term)
    if var_u <= 0:
        return MannWhitneyResult(u_x, 0.0, 1.0, n_x, n_y)
    diff = abs(u_x - mean_u)
    if continuity:
        diff = max(diff - 0.5, 0.0)
    z = diff / math.sqrt(var_u)
    p = min(1.0, math.erfc(z / math.sqrt(2.0)))
    return MannWhitneyResult(u_x, z if u_x >= mean_u else -z, p, n_x, n_y)


def parse_statistic(name: str) -> float | None:
    """``"p99"`` -> 99.0, ``"p99.9"`` -> 99.9, ``"mean"`` -> None; anything else is an error."""
    m = _STAT_RE.match(name)
    if not m:
        raise ValueError(f"statistic '{name}': expected 'mean' or a percentile such as 'p50', 'p99', 'p99.9'")
    if m.group(1) is None:
        return None
    q = float(m.group(1))
    if not 0 < q <= 100:
        raise ValueError(f"statistic '{name}': the percentile must be in (0, 100]")
    return q


def statistic_value(values: np.ndarray, statistic: str) -> float:
    """The named statistic of ``values`` (linear-interpolated percentile, as pdperf.metrics)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        raise ValueError(f"statistic {statistic} of an empty sample set")
    q = parse_statistic(statistic)
    return float(np.mean(values)) if q is None else float(np.percentile(values, q))


def _statistic_rows(matrix: np.ndarray, statistic: str) -> np.ndarray:
    q = parse_statistic(statistic)
    rows: np.ndarray = matrix.mean(axis=1) if q is None else np.percentile(matrix, q, axis=1)
    return rows


def even_subsample(values: np.ndarray, cap: int = DEFAULT_SAMPLE_CAP) -> np.ndarray:
    """At most ``cap`` values, deterministically: evenly spaced order statistics.

    Keeps the minimum and the maximum, and every quantile to within 1/cap, so percentiles of
    the result match those of the input; the same input always gives the same output.
    Returns the values sorted when it reduces them, untouched otherwise.
    """
    values = np.asarray(values, dtype=float).ravel()
    if cap < 2:
        raise ValueError(f"even_subsample: cap must be >= 2 (got {cap})")
    if len(values) <= cap:
        return values
    ordered = np.sort(values)
    idx = np.round(np.linspace(0, len(ordered) - 1, cap)).astype(int)
    picked: np.ndarray = ordered[idx]
    return picked


def bootstrap_ratio_ci(current: np.ndarray, baseline: np.ndarray, statistic: str, *,
                       resamples: int = 1000, level: float = 0.95, seed: int = 0,
                       cap: int = DEFAULT_SAMPLE_CAP) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of ``statistic(current) / statistic(baseline)``.

    Each side is resampled with replacement on its own (they are independent runs). Returns
    None when either side has fewer than 10 samples or a resampled baseline statistic is 0
    (a ratio to zero has no meaning). Seeded: the same inputs give the same interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ratio_ci: level must be in (0, 1), got {level}")
    cur = even_subsample(np.asarray(current, dtype=float), cap)
    base = even_subsample(np.asarray(baseline, dtype=float), cap)
    if len(cur) < 10 or len(base) < 10:
        return None
    rng = np.random.default_rng(seed)
    cur_stats = _statistic_rows(cur[rng.integers(0, len(cur), size=(resamples, len(cur)))], statistic)
    base_stats = _statistic_rows(base[rng.integers(0, len(base), size=(resamples, len(base)))], statistic)
    if np.any(base_stats == 0):
        return None
    ratios = cur_stats / base_stats
    lo, hi = np.percentile(ratios, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def format_p_value(p: float | None) -> str:
    """``1e-12``, ``0.003``, ``0.41``; an underflowed 0 prints as ``<1e-300``."""
    if p is None:
        return "n/a"
    if p <= 0:
        return "<1e-300"
    if p < 1e-3:
        return f"{p:.0e}".replace("e-0", "e-")
    return f"{p:.2g}"


def format_value(v: float | None) -> str:
    """A measurement with 3 significant digits, without scientific notation in the usual range."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"
