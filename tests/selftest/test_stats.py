"""pdperf.stats against values worked out by hand, and the properties the gate relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdperf.stats import (
    bootstrap_ratio_ci,
    even_subsample,
    format_p_value,
    format_value,
    mann_whitney_u,
    parse_statistic,
    rank_average,
    statistic_value,
)

pytestmark = pytest.mark.selftest


def test_rank_average_gives_ties_their_mean_rank():
    ranks, counts = rank_average(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))
    # sorted: 1 (rank 1), 2 (rank 2), 3 3 3 (ranks 3, 4, 5 -> 4 each)
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert sorted(counts.tolist()) == [1, 1, 3]


def test_mann_whitney_separated_samples_matches_hand_computation():
    # x = 1,2,3 below y = 4,5,6: U_x = 0, mean 4.5, var = 3*3/12 * 7 = 5.25 (no ties),
    # z = (4.5 - 0.5) / sqrt(5.25) = 1.74574, p = erfc(z / sqrt 2) = 0.080856 (scipy asymptotic agrees).
    r = mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert r.u_x == 0
    assert r.z == pytest.approx(-4.0 / math.sqrt(5.25))
    assert r.p_value == pytest.approx(math.erfc(4.0 / math.sqrt(5.25) / math.sqrt(2)))
    assert r.p_value == pytest.approx(0.0808556, abs=1e-6)
    assert r.effect == 0.0


def test_mann_whitney_with_ties_matches_hand_computation():
    # x = 1,1,2,2,3 and y = 2,3,3,4,4. Pooled ranks: 1 -> 1.5, 2 -> 4, 3 -> 7, 4 -> 9.5.
    # R_x = 1.5+1.5+4+4+7 = 18, U_x = 18 - 15 = 3. Tie groups 2,3,3,2: sum(t^3 - t) = 60.
    # var = 25/12 * (11 - 60/90) = 21.5278; z = (12.5 - 3 - 0.5) / sqrt(var) = 1.93974.
    r = mann_whitney_u([1, 1, 2, 2, 3], [2, 3, 3, 4, 4])
    assert r.u_x == 3
    var = 25 / 12 * (11 - 60 / 90)
    assert abs(r.z) == pytest.approx(9.0 / math.sqrt(var))
    assert r.p_value == pytest.approx(0.0524116, abs=1e-6)


def test_mann_whitney_identical_samples_give_p_one():
    x = np.random.default_rng(1).lognormal(0, 0.5, 300)
    assert mann_whitney_u(x, x.copy()).p_value == 1.0
    assert mann_whitney_u([5.0] * 20, [5.0] * 30).p_value == 1.0  # zero variance: nothing to tell apart


def test_mann_whitney_shifted_samples_give_tiny_p_and_symmetric():
    rng = np.random.default_rng(2)
    a = rng.lognormal(0, 0.3, 500)
    b = a * 1.5
    r = mann_whitney_u(b, a)
    assert r.p_value < 1e-20
    assert r.z > 0 and r.effect > 0.8
    assert mann_whitney_u(a, b).p_value == pytest.approx(r.p_value)


def test_mann_whitney_same_distribution_is_not_significant_most_of_the_time():
    rng = np.random.default_rng(3)
    ps = [mann_whitney_u(rng.normal(size=100), rng.normal(size=100)).p_value for _ in range(200)]
    false_alarms = sum(p < 0.01 for p in ps)
    assert false_alarms <= 6  # about 1% expected


def test_mann_whitney_refuses_empty_or_nan():
    with pytest.raises(ValueError, match="both sides"):
        mann_whitney_u([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mann_whitney_u([1.0, float("nan")], [1.0])


def test_parse_statistic():
    assert parse_statistic("p99") == 99.0
    assert parse_statistic("p99.9") == 99.9
    assert parse_statistic("mean") is None
    for bad in ("P99", "median", "p", "p101"):
        with pytest.raises(ValueError, match="statistic"):
            parse_statistic(bad)


def test_statistic_value_uses_linear_interpolation():
    v = np.arange(1.0, 11.0)  # 1..10
    assert statistic_value(v, "p50") == 5.5
    assert statistic_value(v, "mean") == 5.5
    assert statistic_value(v, "p90") == pytest.approx(9.1)


def test_even_subsample_keeps_extremes_and_quantiles_and_is_deterministic():
    rng = np.random.default_rng(4)
    v = rng.lognormal(0, 1, 50_000)
    s = even_subsample(v, 5000)
    assert len(s) == 5000
    assert s[0] == v.min() and s[-1] == v.max()
    for q in (50, 90, 99):
        assert np.percentile(s, q) == pytest.approx(np.percentile(v, q), rel=0.01)
    assert np.array_equal(s, even_subsample(v, 5000))
    small = np.array([3.0, 1.0, 2.0])
    assert even_subsample(small, 5000).tolist() == [3.0, 1.0, 2.0]  # untouched below the cap


def test_bootstrap_ratio_ci_contains_true_ratio_and_is_seeded():
    rng = np.random.default_rng(5)
    base = rng.lognormal(np.log(10), 0.2, 1000)
    cur = rng.lognormal(np.log(20), 0.2, 1000)
    lo, hi = bootstrap_ratio_ci(cur, base, "p50", resamples=500)
    assert lo < 2.0 < hi and hi - lo < 0.2
    assert bootstrap_ratio_ci(cur, base, "p50", resamples=500) == (lo, hi)
    lo99, hi99 = bootstrap_ratio_ci(cur, base, "p99", resamples=500)
    assert lo99 < 2.0 < hi99 and (hi99 - lo99) > (hi - lo)  # tails are less certain than medians
    same_lo, same_hi = bootstrap_ratio_ci(base, base, "mean", resamples=500)
    assert same_lo < 1.0 < same_hi


def test_bootstrap_ratio_ci_none_when_too_few_or_zero_baseline():
    assert bootstrap_ratio_ci([1.0] * 5, [1.0] * 50, "p50") is None
    assert bootstrap_ratio_ci([1.0] * 50, [0.0] * 50, "p50") is None


def test_formatting():
    assert format_p_value(1.2e-12) == "1e-12"
    assert format_p_value(0.0031) == "0.0031"
    assert format_p_value(0.41) == "0.41"
    assert format_p_value(0.0) == "<1e-300"
    assert format_value(14.123) == "14.1"
    assert format_value(1234.5) == "1,234"
    assert format_value(None) == "n/a"
