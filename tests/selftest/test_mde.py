"""What the gate can detect: the minimum detectable regression (pdperf.gate.mde), its CLI and report
lines, and the CI workflows that run the gate (.github/workflows).

The MDE is a power analysis by simulation of the gate's own rule; the checks here hold it to its
properties (never below the limit, wider with a wider band, narrower with more requests, few false
alarms on a tight band) and, the one that matters, to the gate itself: synthetic runs slowed by the
computed MDE are flagged by ``compare_point`` at least 90 % of the time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from fixtures.reporting import record_mde
from pdperf.cli import main as cli_main
from pdperf.gate import compare_point, load_baseline, load_thresholds, write_baseline
from pdperf.gate.mde import (
    REPORT_GATES,
    GateSimulation,
    Mde,
    e2e_increase_for_throughput_drop,
    gate_mde,
    mde_warnings,
    point_mdes,
    throughput_drop,
)
from pdperf.gate.point import VerdictRecord
from pdperf.gate.store import new_entry
from pdperf.gate.thresholds import ResolvedThresholds
from pdperf.report import build_report
from pdperf.report.synthetic import synthetic_point
from pdperf.results import atomic_write_json, save_point

pytestmark = pytest.mark.selftest

ROOT = Path(__file__).resolve().parents[2]
GPU = "gpu-test"  # default (GPU) limits: TPOT p50 +15 %, TTFT p50 +25 %, E2E mean +20 %


@pytest.fixture(scope="module")
def thresholds():
    return load_thresholds()


@pytest.fixture(scope="module")
def gpu(thresholds) -> ResolvedThresholds:
    return thresholds.resolve(GPU)


def gate_of(resolved: ResolvedThresholds, key: str):
    return next(g for g in resolved.gates if g.key == key)


def point(*, seed: int, n: int = 100, tpot_ms: float = 10.0, ttft_ms: float = 50.0, sigma: float = 0.25,
          started: str = "2026-11-27T12:00:00+00:00"):
    p = synthetic_point("colloc", "w", 4, n=n, tpot_ms=tpot_ms, ttft_ms=ttft_ms, sigma=sigma, seed=seed,
                        hardware_id=GPU)
    return dataclasses.replace(p, started_at=started)


def band_entry(tmp_path: Path, *tpots: float, n: int = 100):
    """A stored baseline of c4 whose band holds one run per TPOT (the first run's samples kept)."""
    for i, t in enumerate(tpots):
        write_baseline(tmp_path, [point(seed=i, n=n, tpot_ms=t, ttft_ms=5 * t, started=f"2026-11-27T1{i}:00:00+00:00")],
                       add_run=True)
    return load_baseline(tmp_path, GPU, "colloc", "w").points["c4"]


# --------------------------------------------------------------------------- properties


def test_mde_is_at_least_the_limit(gpu):
    entry = new_entry(point(seed=0))
    for m in point_mdes(entry, gpu):
        assert m.mde is not None, m
        assert m.mde >= m.limit - 1e-9, m  # the size rule alone needs the limit
        assert m.band_runs == 1 and m.why.endswith("no band: optimistic")
        assert m.draws == 300 and m.requests == 100


def test_mde_grows_with_the_band_spread(tmp_path, gpu):
    tight = band_entry(tmp_path / "tight", 10.0, 10.1, 10.2)
    wide = band_entry(tmp_path / "wide", 10.0, 11.0, 12.0)
    gate = gate_of(gpu, "p50 tpot_ms")
    m_tight, m_wide = gate_mde(tight, gate, gpu), gate_mde(wide, gate, gpu)
    assert m_tight.band_runs == m_wide.band_runs == 3
    assert m_tight.mde is not None and m_wide.mde is not None
    assert m_tight.limit <= m_tight.mde < m_wide.mde
    assert m_wide.mde > 0.15 + 0.10  # a band 20 % wide: the limit counts from its worst run, plus its spread
    assert m_wide.between_run_sigma > m_tight.between_run_sigma
    assert m_wide.why.startswith("spread-bound")


def test_mde_falls_with_more_samples(gpu):
    """A noisy metric (TTFT p50, lognormal sigma 0.6 per request): the significance tests decide."""
    entry = new_entry(point(seed=0, n=400, sigma=0.6))
    gate = gate_of(gpu, "p50 ttft_ms")
    few, many = gate_mde(entry, gate, gpu, requests=40), gate_mde(entry, gate, gpu, requests=400)
    assert few.requests == 40 and many.requests == 400
    assert few.mde is not None and many.mde is not None
    assert few.mde > many.mde + 0.1
    assert few.why.startswith("noise-bound")


def test_false_alarms_at_no_change_stay_near_alpha_for_a_tight_band(tmp_path, gpu):
    entry = band_entry(tmp_path, 10.0, 10.05, 9.95)
    for m in point_mdes(entry, gpu):
        assert m.false_alarm is not None and m.false_alarm <= 2 * gpu.alpha, m


def test_a_point_with_too_few_requests_cannot_be_gated_and_says_so(gpu):
    entry = new_entry(point(seed=0, n=16))
    mdes = {m.key: m for m in point_mdes(entry, gpu)}
    tpot = mdes["p50 tpot_ms"]
    assert tpot.mde is None and tpot.false_alarm is None
    assert tpot.why.startswith("insufficient: 16 samples a run, the gate needs 30")
    assert mdes["p50 itl_ms"].mde is not None  # 16 requests x 15 gaps: gated, per request
    warnings = mde_warnings(mdes.values())
    assert any("10% regression of TPOT p50" in w and "not gated" in w for w in warnings)
    assert any("throughput" in w and "Little's law" in w for w in warnings)


def test_throughput_is_read_through_e2e_mean_by_littles_law():
    assert e2e_increase_for_throughput_drop(0.10) == pytest.approx(1 / 0.9 - 1)
    assert throughput_drop(e2e_increase_for_throughput_drop(0.10)) == pytest.approx(0.10)
    fine = Mde("e2e_ms", "mean", 0.08, 0.0, 300, 3, 0.05, "limit-bound")
    coarse = dataclasses.replace(fine, mde=0.2)
    assert mde_warnings([fine]) == []
    [line] = mde_warnings([coarse])
    assert "10% throughput drop" in line and "-17%" in line and "E2E mean +11.1%" in line
    [rate] = mde_warnings([coarse], sweep_kind="rate")
    assert "offered rate" in rate
    assert Mde.from_dict(json.loads(json.dumps(coarse.to_dict()))) == coarse


# --------------------------------------------------------------------------- the method against the gate


@pytest.mark.parametrize("key", ["p50 tpot_ms", "mean e2e_ms", "p50 itl_ms", "p90 chunk_gap_ms", "p99 ttft_ms"])
def test_the_simulation_judges_each_draw_as_judge_metric_does(gpu, key):
    """The simulation evaluates the gate's rule for all draws at once; ``judge_metric`` itself on the
    same drawn arrays must agree (interval to rounding, verdict exactly), per request and pooled."""
    entry = new_entry(point(seed=0, n=120, sigma=0.4))
    sim = GateSimulation(entry, gate_of(gpu, key), alpha=gpu.alpha, ci_level=gpu.ci_level,
                         resamples=gpu.bootstrap_resamples, draws=40, seed=3)
    assert sim.why_not is None
    assert sim.per_request == (key in ("p50 itl_ms", "p90 chunk_gap_ms"))
    thresholds = sim.thresholds()
    for s in (0.0, 0.13, 0.27, 0.55):
        fast = sim.detected(s)
        np.testing.assert_array_equal(fast, thresholds <= s)
        for j in range(0, 40, 5):
            v = sim.judge(j, s)
            assert (v.verdict == "regressed") == bool(fast[j]), (s, j, v.message())
            assert v.ratio_ci is not None
            assert v.ratio_ci[0] == pytest.approx(sim.factor[j] * (1 + s) * sim.ci_low[j], rel=1e-9)


@functools.cache
def unchanged_runs(sigma: float, n: int) -> tuple:
    """30 fresh runs of the synthetic point (other seeds than its baseline's)."""
    return tuple(point(seed=seed, n=n, sigma=sigma) for seed in range(1000, 1030))


def slowed(run, k: float):
    """The run with every time since a request's scheduled start multiplied by ``k``: TTFT, TPOT, ITL
    and E2E all x k."""
    def scale(t: float | None, start: float) -> float | None:
        return None if t is None else start + (t - start) * k

    records = [dataclasses.replace(r, first_token_s=scale(r.first_token_s, r.scheduled_s),
                                   end_s=scale(r.end_s, r.scheduled_s),
                                   chunk_times_s=[r.scheduled_s + (t - r.scheduled_s) * k for t in r.chunk_times_s])
               for r in run.records]
    return dataclasses.replace(run, records=records)


@pytest.mark.parametrize("sigma,n", [(0.25, 100), (0.6, 40)])
@pytest.mark.parametrize("key", ["p50 tpot_ms", "p50 ttft_ms", "mean e2e_ms", "p50 itl_ms"])
def test_the_gate_flags_runs_slowed_by_the_mde(gpu, key, sigma, n):
    """Fresh synthetic runs (other seeds) slowed by the computed MDE, gated by compare_point as a sweep
    would: flagged in >= 90 % of 30 trials; unchanged ones (s = 0) almost never."""
    entry = new_entry(point(seed=0, n=n, sigma=sigma))
    gate = gate_of(gpu, key)
    m = gate_mde(entry, gate, gpu)
    assert m.mde is not None
    one = ResolvedThresholds(gpu.alpha, gpu.ci_level, gpu.bootstrap_resamples, (gate,), "test")

    def regressed(run) -> bool:
        [v] = compare_point(run, entry, entry.environment, one).verdicts
        return v.verdict == "regressed"

    runs = unchanged_runs(sigma, n)
    assert sum(regressed(slowed(run, 1 + m.mde)) for run in runs) >= 27, m
    assert sum(regressed(run) for run in runs) <= 1, m


def test_one_statistic_of_a_point_takes_well_under_a_second(gpu):
    entry = new_entry(point(seed=0, n=128, sigma=0.3))
    for key in REPORT_GATES + ("p50 itl_ms",):
        start = time.perf_counter()
        gate_mde(entry, gate_of(gpu, key), gpu)
        assert time.perf_counter() - start < 1.0, key


# --------------------------------------------------------------------------- where it is shown


def test_baseline_mde_and_show_print_the_mde_and_the_warnings(tmp_path, capsys):
    band_entry(tmp_path, 10.0, 10.5)
    path = tmp_path / GPU / "colloc" / "w.json"
    out_json = tmp_path / "mde.json"
    assert cli_main(["baseline", "mde", str(tmp_path), "--json", str(out_json), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "p50 tpot_ms" in out and "false alarm" in out and str(path) in out
    assert "cannot catch a 10% regression of TPOT p50" in out and "Little's law" in out
    data = json.loads(out_json.read_text())
    [f] = data["files"]
    [p] = f["points"]
    assert p["point"] == "c4" and {m["key"] for m in p["mdes"]} >= set(REPORT_GATES)
    assert all(m["draws"] == 200 for m in p["mdes"])
    assert cli_main(["baseline", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "MDE (95% detection, 100 requests a run)" in shown and "! cannot catch" in shown
    assert cli_main(["baseline", "show", str(path), "--no-mde"]) == 0
    assert "MDE" not in capsys.readouterr().out


def test_baseline_mde_skips_a_retired_file(capsys):
    retired = sorted((ROOT / "baselines" / "h100-x4").rglob("*.json"))[0]
    assert cli_main(["baseline", "mde", str(retired)]) == 0
    assert "retired" in capsys.readouterr().out


def test_report_shows_what_each_gated_point_can_detect(tmp_path, thresholds):
    store = tmp_path / "baselines"
    write_baseline(store, [point(seed=0)])
    (store / "thresholds.yaml").write_text((ROOT / "baselines" / "thresholds.yaml").read_text())
    run_dir = tmp_path / "run"
    current = point(seed=1)
    save_point(run_dir / "points" / "colloc__w__c4.json", current)
    gate = compare_point(current, new_entry(point(seed=0)), current.environment, thresholds)
    atomic_write_json(run_dir / "verdicts.json", [VerdictRecord(test_id="t[colloc/w/c4]", outcome="passed",
                                                                points=[current.id], gate=gate).to_dict()])
    plain = build_report(run_dir).read_text()
    assert "What the gate can detect" not in plain
    html = build_report(run_dir, baselines_dir=store).read_text()
    assert "What the gate can detect" in html and "E2E mean (throughput)" in html and "Little" in html
    assert "cannot catch a 10% regression of TPOT p50" in html


def test_judge_records_the_mde_as_a_junit_property(tmp_path, thresholds):
    write_baseline(tmp_path, [point(seed=0)])
    node = SimpleNamespace(user_properties=[])
    record_mde(node, tmp_path, point(seed=1), thresholds)  # type: ignore[arg-type]
    [(name, value)] = node.user_properties
    assert name == "pdperf_mde"
    mdes = [Mde.from_dict(d) for d in json.loads(value)]
    assert {m.key for m in mdes} == {g.key for g in thresholds.resolve(GPU).gates}
    record_mde(node, tmp_path / "empty", point(seed=1), thresholds)  # type: ignore[arg-type]
    assert len(node.user_properties) == 1  # no baseline: nothing recorded


# --------------------------------------------------------------------------- CI workflows


def _workflow(name: str) -> dict:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_gpu_gate_workflow_never_shares_a_cluster_and_publishes_its_verdicts():
    wf = _workflow("gpu-gate.yml")
    assert "workflow_dispatch" in wf["on"]
    group = wf["concurrency"]["group"]
    assert "gpu" in group and wf["concurrency"]["cancel-in-progress"] is False
    [job] = wf["jobs"].values()
    assert "self-hosted" in json.dumps(job["runs-on"])
    steps = json.dumps(job["steps"])
    assert "scripts/setup.sh gpu" in steps
    assert "-m sweep" in steps and "--ray-address" in steps and "--confirm-regressions" in steps
    assert "actions/upload-artifact@v" in steps
    assert "mikepenz/action-junit-report@v" in steps


def test_baseline_update_workflow_records_on_a_branch_and_opens_a_pull_request():
    wf = _workflow("baseline-update.yml")
    assert set(wf["on"]) == {"workflow_dispatch"}
    assert wf["concurrency"]["group"] == _workflow("gpu-gate.yml")["concurrency"]["group"]  # one cluster
    [job] = wf["jobs"].values()
    steps = json.dumps(job["steps"])
    assert "--update-baselines" in steps and "--add-baseline-runs" in steps
    assert "peter-evans/create-pull-request@v" in steps
