"""Per-token gates judge significance per request (pdperf.gate.verdicts.judge_metric).

The gaps of one request move together: on 4x H100 (PD 1P1D, c1) one request's median ITL was
18 ms and the next one's 37 ms. Pooled as independent samples, 16 requests x 255 gaps made a
17% move between two runs of unchanged code look certain (p = 8e-193, CI 0.80-0.86): had it gone
the other way, the ITL gate (+15%) would have failed unchanged code. These tests hold the gate
to the real data of that pair and to simulated runs with the same structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdperf import metrics
from pdperf.gate import Gate, compare_point, judge_metric, load_baseline, load_thresholds, write_baseline
from pdperf.gate.store import new_entry
from pdperf.metrics import summarize
from pdperf.results import PointResult, RequestRecord

pytestmark = pytest.mark.selftest

DATA = Path(__file__).parent / "data" / "gpu_pd_c1_record_vs_gate.json"
ITL_P50 = Gate(metric="itl_ms", statistic="p50", max_change=0.15, direction="lower-is-better")


def point_of(requests: list[dict], environment: dict, *, point_id: str = "c1") -> PointResult:
    records, t = [], 0.0
    for i, q in enumerate(requests):
        first = t + q["ttft_ms"] / 1000
        chunks = list(first + np.concatenate([[0.0], np.cumsum(q["gaps_ms"])]) / 1000)
        chunks = [first + (c - first) for c in chunks]
        tokens = q.get("chunk_tokens") or [1] * len(chunks)
        records.append(RequestRecord(index=i, scheduled_s=t, sent_s=t, first_token_s=chunks[0], end_s=chunks[-1],
                                     chunk_times_s=chunks, chunk_tokens=tokens, input_tokens=1024,
                                     output_tokens=sum(tokens)))
        t = chunks[-1] + 0.01
    return PointResult(topology="pd-1p1-1d1-pack", workload="gpu-small-isl1024-osl256", point_id=point_id,
                       sweep_kind="concurrency", point_value=1.0, gpus=2, started_at="2026-11-27T14:43:34+00:00",
                       duration_s=t, records=records, summary=summarize(records, duration_s=t, gpus=2),
                       environment=dict(environment), flags=[])


@pytest.fixture(scope="module")
def gpu_pair():
    data = json.loads(DATA.read_text())
    return tuple(point_of(data["runs"][k]["requests"], data["runs"][k]["environment"]) for k in ("record", "gate"))


def itl_p50(result):
    return next(v for v in result.verdicts if v.key == "p50 itl_ms")


def test_gpu_rerun_of_unchanged_code_is_unchanged_per_request(gpu_pair):
    record, gate = gpu_pair
    result = compare_point(gate, new_entry(record), record.environment, load_thresholds())
    v = itl_p50(result)
    assert v.ratio == pytest.approx(0.83, abs=0.01)  # the move is real in size ...
    assert v.verdict == "unchanged" and v.ratio_ci[0] < 1 < v.ratio_ci[1]  # ... and not beyond run-to-run spread
    assert (v.requests_current, v.requests_baseline) == (16, 16) and "over 16/16 requests" in v.message()
    assert result.status == "unchanged" and not any("pooled" in n for n in result.notes)


def test_a_baseline_without_per_request_values_is_judged_pooled_and_says_so(gpu_pair):
    record, gate = gpu_pair
    pooled_only = new_entry(record).model_copy(update={"request_stats": {}})  # as recorded before they were kept
    result = compare_point(gate, pooled_only, record.environment, load_thresholds())
    v = itl_p50(result)
    assert v.verdict == "improved" and v.ratio_ci[1] < 0.9 and v.requests_current is None  # what the gate said then
    assert any("no per-request values for p50 itl_ms" in n and "--update-baselines" in n for n in result.notes)


def test_baselines_keep_each_requests_statistics(tmp_path, gpu_pair):
    record, _ = gpu_pair
    [path] = write_baseline(tmp_path, [record])
    stats = load_baseline(tmp_path, "h100-x4", record.topology, record.workload).entry("c1").request_stats
    assert set(stats) == set(metrics.PER_GAP_METRICS)
    assert set(stats["itl_ms"]) == set(metrics.REQUEST_STATISTICS) and len(stats["itl_ms"]["p50"]) == 16
    medians = sorted(stats["itl_ms"]["p50"])
    assert medians[-1] / medians[0] > 1.5  # one request's median gap is not the next one's


def correlated_run(rng, *, requests: int = 16, gaps: int = 255, slow: float = 1.0, spread: float = 0.25):
    """Per request a speed drawn once (lognormal, the GPU pair's spread), then gaps around it."""
    speed = np.exp(rng.normal(0, spread, requests))
    return [list(20.0 * slow * s * np.exp(rng.normal(0, 0.15, gaps))) for s in speed]


def judge(cur, base, *, per_request: bool):
    flat = lambda run: np.concatenate([np.asarray(r) for r in run])  # noqa: E731
    kw = {}
    if per_request:
        kw = dict(current_requests=np.array([np.median(r) for r in cur]),
                  baseline_requests=np.array([np.median(r) for r in base]))
    return judge_metric(ITL_P50, flat(cur), flat(base), alpha=0.01, ci_level=0.99, resamples=400, **kw).verdict


def test_identical_runs_with_correlated_gaps_rarely_alarm_per_request_unlike_pooled():
    rng = np.random.default_rng(7)
    pairs = [(correlated_run(rng), correlated_run(rng)) for _ in range(30)]
    per_request = [judge(c, b, per_request=True) for c, b in pairs]
    pooled = [judge(c, b, per_request=False) for c, b in pairs]
    assert per_request.count("regressed") <= 1
    assert pooled.count("regressed") > per_request.count("regressed")  # the old gate's false alarms


def test_a_real_slowdown_is_still_caught_per_request():
    rng = np.random.default_rng(11)
    caught = [judge(correlated_run(rng, slow=1.6), correlated_run(rng), per_request=True) for _ in range(10)]
    assert caught.count("regressed") >= 9


def test_the_message_names_the_ratio_its_interval_belongs_to():
    """A few requests with long tails move the pooled p99 far more than the median request's p99
    (4x H100, c64: pooled x2.02, CI of the median request 1.28-1.65): both are printed, so an
    interval that misses the pooled ratio reads as what it is."""
    rng = np.random.default_rng(3)
    base = [list(20.0 * np.exp(rng.normal(0, 0.1, 255))) for _ in range(64)]
    cur = [list(26.0 * np.exp(rng.normal(0, 0.1, 255))) for _ in range(64)]
    for r in cur[:4]:
        r[:20] = [400.0] * 20  # four requests stall: the pooled p99 jumps
    gate = Gate(metric="itl_ms", statistic="p99", max_change=0.30, direction="lower-is-better")
    flat = lambda run: np.concatenate([np.asarray(r) for r in run])  # noqa: E731
    per = lambda run: np.array([np.percentile(r, 99) for r in run])  # noqa: E731
    v = judge_metric(gate, flat(cur), flat(base), alpha=0.01, ci_level=0.99, resamples=400,
                     current_requests=per(cur), baseline_requests=per(base))
    assert v.ratio > v.ratio_ci[1]  # the pooled ratio lies outside the per-request interval ...
    assert v.ratio_ci[0] <= v.request_ratio <= v.ratio_ci[1]  # ... the median request's does not
    assert f"median request x{v.request_ratio:.2f}, CI" in v.message()
    pooled = judge_metric(gate, flat(cur), flat(base), alpha=0.01, ci_level=0.99, resamples=400)
    assert pooled.request_ratio is None and "median request" not in pooled.message()
