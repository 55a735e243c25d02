"""The report's "Predicted vs measured (planner)" section, and measured points from an archived results.csv.

Synthetic PD points with exact timings (sigma 0) and a small hand-written profile: the table
must show, per PD point, the planner's prediction with its interval, the measured value and
the relative error, the same numbers ``predict_for_result`` gives; without a profile for the
run's hardware and model, one note says so and how to make one.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from pdperf.gate.thresholds import BASELINE_ROOT
from pdperf.planner import PlannerError, load_profile, predict_for_result
from pdperf.planner.fit import REPORT_METRICS
from pdperf.planner.predict import measured_point
from pdperf.planner.profiles import (
    Calibration,
    DecodeParams,
    KVCacheParams,
    MetricQuality,
    ModelParams,
    OverheadParams,
    PrefillParams,
    Profile,
    profile_path,
    save_profile,
)
from pdperf.planner.results_csv import load_results_csv, run_identity
from pdperf.report import build_report, summary_fragment
from pdperf.report.export import write_results_csv
from pdperf.report.synthetic import synthetic_point
from pdperf.results import PointResult, atomic_write_json, save_point
from pdperf.specs import ROOT, TOPOLOGY_DIR, load_topology
from pdperf.stats import format_value

pytestmark = pytest.mark.selftest

HW, MODEL = "h100-x4", "llama-3.1-8b"
ENV = {"hardware_id": HW, "model": MODEL}
WORKLOAD = "gpu-small-isl1024-osl256"


def _profile(configs: list[str]) -> Profile:
    params = ModelParams(ref_tp=2, prefill=PrefillParams(ms_per_ktoken=10.0, tp_exponent=0.7),
                         decode=DecodeParams(step_ms=6.0, per_seq_ms_per_ktoken=0.05),
                         kv_cache=KVCacheParams(weights_gb=16.1, bytes_per_token=131072.0),
                         overheads=OverheadParams(fixed_ms=40.0, jitter_ms=10.0, convoy=0.3))
    quality = MetricQuality(in_sample_mdape=5.0, leave_one_config_out_mdape=12.0, points=4)
    cal = Calibration(source=["synthetic"], points=4, configs=configs, tps=[2], isl=[128], osl=[16], loads=[4, 16],
                      requests_per_slot=None, fitted=[], assumed={}, quality={m: quality for m in REPORT_METRICS},
                      loco_log_residuals={m: [-0.1, 0.0, 0.1] for m in REPORT_METRICS},
                      in_sample_log_residuals={})
    return Profile(hardware_id=HW, model=MODEL, params=params, calibration=cal, created_at="2026-12-03T10:00:00+00:00")


def _store(tmp_path: Path, configs: tuple[str, ...] = ("colloc-2xtp2",)) -> Path:
    baselines = tmp_path / "baselines"
    save_profile(profile_path(baselines / "profiles", HW, MODEL), _profile(list(configs)))
    return baselines


def _run(tmp_path: Path, topologies=(("pd-1p2-1d2-pack", 4), ("colloc-2xtp2", 4)), env=ENV,
         loads=(4, 16)) -> tuple[Path, list[PointResult]]:
    run = tmp_path / "run"
    points = []
    for topo, gpus in topologies:
        for c in loads:
            ttft, tpot = 60 + 3 * c, 6 + 0.2 * c
            e2e_s = (ttft + 15 * tpot) / 1000  # sent e2e / c apart: a closed loop of c
            p = synthetic_point(topo, WORKLOAD, c, gpus=gpus, n=5 * c, ttft_ms=ttft, tpot_ms=tpot, sigma=0,
                                environment=env, spacing_s=e2e_s / c)
            save_point(run / "points" / f"{topo}__{WORKLOAD}__c{c}.json", p)
            points.append(p)
    return run, points


def _section(html: str) -> str:
    start = html.index("<h2>Predicted vs measured (planner)</h2>")
    end = html.find("<h2>", start + 10)
    return html[start:end if end > 0 else None]


def _row(section: str, point_id: str) -> str:
    m = re.search(rf'<tr><td class="id">{re.escape(point_id)}</td>(.*?)</tr>', section)
    assert m, f"no row for {point_id}"
    return m.group(1)


def _cells(row: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


def test_table_shows_prediction_interval_measurement_and_error(tmp_path):
    run, points = _run(tmp_path)
    baselines = _store(tmp_path)
    section = _section(build_report(run, baselines_dir=baselines).read_text())
    profile = load_profile(profile_path(baselines / "profiles", HW, MODEL))
    assert f"<h3>{HW} / {MODEL}</h3>" in section and "fitted to 4 points of colloc-2xtp2" in section
    assert "leave-one-config-out error (median): TTFT p50 12%" in section
    pd_points = [p for p in points if p.topology.startswith("pd-")]
    for p in pd_points:
        cmp = predict_for_result(profile, p)
        cells = _cells(_row(section, p.id))
        assert len(cells) == 3 * 4 + 2
        for i, metric in enumerate(("med_ttft_ms", "p99_ttft_ms", "med_tpot_ms", "out_tok_s")):
            pred, iv = cmp.predicted.prediction.metric(metric), cmp.predicted.interval(metric)
            assert cells[3 * i] == f"{format_value(pred)} [{format_value(iv.lo)}–{format_value(iv.hi)}]", metric
            assert cells[3 * i + 1] == format_value(cmp.measured.value(metric))
            err = cmp.error_pct(metric)
            assert err is not None and cells[3 * i + 2] == f"{err:+.1f}%"
        assert cells[-2] == cmp.predicted.prediction.bottleneck
    # the measured side is the point itself (sigma 0: exact), the error is predicted / measured - 1
    c4 = next(p for p in pd_points if p.point_value == 4)
    cells = _cells(_row(section, c4.id))
    assert cells[1] == "72" and cells[7] == "6.8"  # TTFT 60 + 3 * 4 ms, TPOT 6 + 0.2 * 4 ms
    pred_ttft = predict_for_result(profile, c4).predicted.prediction.med_ttft_ms
    assert cells[2] == f"{(pred_ttft / 72 - 1) * 100:+.1f}%"
    # outside the interval is red, inside is not
    row = _row(section, c4.id)
    within = predict_for_result(profile, c4).within_interval("med_ttft_ms")
    assert ('class="num lose"' in row.split("</td>")[2]) == (within is False)
    # collocated points are not predicted here; the median error over the PD points is
    assert "colloc-2xtp2/" not in section
    assert "Median |error| on this run's 2 predicted PD points: TTFT p50" in section
    assert "no profile" not in section
    assert _section(summary_fragment(run, baselines_dir=baselines)) == section  # pytest-html's copy


def test_a_configuration_the_profile_was_fitted_to_is_marked_in_sample(tmp_path):
    run, points = _run(tmp_path, loads=(4,))
    section = _section(build_report(run, baselines_dir=_store(tmp_path, ("pd-1p2-1d2-pack",))).read_text())
    pd = next(p for p in points if p.topology == "pd-1p2-1d2-pack")
    assert "in calibration (in-sample)" in _cells(_row(section, pd.id))[-1]


def test_without_a_profile_one_note_says_so_and_how_to_make_one(tmp_path):
    run, _ = _run(tmp_path)
    empty = tmp_path / "empty-store"
    section = _section(build_report(run, baselines_dir=empty).read_text())
    assert section.count('class="pdperf-nodata"') == 1 and "<table" not in section
    assert "no profile for this hardware and model" in section
    assert f"{empty}/profiles/{HW}/{MODEL}.json" in section
    assert f"pdperf planner calibrate --runs {run} --store {empty}/profiles" in section


def test_without_baselines_dir_the_committed_profiles_are_looked_up(tmp_path):
    run, _ = _run(tmp_path, env={"hardware_id": "no-such-hw-x1", "model": MODEL})
    section = _section(build_report(run).read_text())
    assert f"{BASELINE_ROOT / 'profiles' / 'no-such-hw-x1' / MODEL}.json" in section


def test_no_pd_point_no_section(tmp_path):
    run, _ = _run(tmp_path, topologies=(("colloc-2xtp2", 4),))
    assert "Predicted vs measured" not in build_report(run, baselines_dir=_store(tmp_path)).read_text()


def test_cpu_pd_points_say_the_planner_models_gpus_only(tmp_path):
    run, _ = _run(tmp_path, topologies=(("cpu-pd-1p1-1d1", 0), ("cpu-colloc-1xtp1", 0)),
                  env={"hardware_id": "cpu-2c-test", "model": "tiny-llama"}, loads=(2,))
    section = _section(build_report(run, baselines_dir=_store(tmp_path)).read_text())
    assert "CPU points: the planner models GPU engines only" in section
    assert "pdperf planner calibrate" not in section


def test_unreadable_profile_missing_model_and_missing_topology_spec_are_said(tmp_path):
    run, _ = _run(tmp_path, topologies=(("pd-custom-nospec", 2),), loads=(4,))
    baselines = _store(tmp_path)
    section = _section(build_report(run, baselines_dir=baselines).read_text())
    assert "pd-custom-nospec/" in section and "its topology spec cannot be read" in section
    profile_path(baselines / "profiles", HW, MODEL).write_text("{not json")
    section = _section(build_report(run, baselines_dir=baselines).read_text())
    assert "profile not usable" in section and "not a JSON profile" in section
    run2, _ = _run(tmp_path / "nomodel", env={"hardware_id": HW}, loads=(4,))
    section = _section(build_report(run2, baselines_dir=baselines).read_text())
    assert "the points do not record their model" in section and "looked for" not in section
    assert f"pdperf planner calibrate --runs {run2} --store {baselines}/profiles --model &lt;model&gt;" in section


# ---------------------------------------------------------------------------------------------- results.csv


def test_results_csv_points_match_the_point_files(tmp_path):
    run, points = _run(tmp_path)
    write_results_csv(points, run / "results.csv", run_id="run-x")
    atomic_write_json(run / "run.json", {"run_id": "run-x", "environment": {"hardware_id": HW},
                                         "command": f"pytest -m sweep --model {MODEL} --engine-arg enforce_eager=true"})
    assert run_identity(run) == (HW, MODEL)
    loaded = load_results_csv(run, workloads=[WORKLOAD])
    assert [p.source.rsplit(":", 1)[1] for p in loaded] == [p.id for p in points]
    for mp, p in zip(loaded, points):
        ref = measured_point(p, load_topology(TOPOLOGY_DIR / f"{p.topology}.yaml"))
        assert mp.config == ref.config and mp.deployment == ref.deployment
        for metric in ("med_ttft_ms", "p99_ttft_ms", "med_tpot_ms", "p99_tpot_ms", "out_tok_s"):
            assert mp.value(metric) == pytest.approx(ref.value(metric)), metric
        # ISL / OSL from the workload spec (the records here carry 128 / 16); warm-up in the spec: steady state
        assert (mp.point.isl, mp.point.osl, mp.point.requests_per_slot) == (1024, 256, None)
        assert mp.requests == len(p.records)
    assert load_results_csv(run, workloads=["other"]) == []


def test_results_csv_errors_name_the_file(tmp_path):
    with pytest.raises(PlannerError, match="results.csv: missing"):
        load_results_csv(tmp_path)
    (tmp_path / "results.csv").write_text("id,topology\n")
    with pytest.raises(PlannerError, match="missing column"):
        load_results_csv(tmp_path)
    run, points = _run(tmp_path / "cpu", topologies=(("cpu-colloc-1xtp1", 0),), loads=(2,))
    write_results_csv(points, run / "results.csv")
    with pytest.raises(PlannerError, match="CPU topology"):
        load_results_csv(run)
    with pytest.raises(PlannerError, match="run.json: missing"):
        run_identity(run)


def test_committed_own_runs_comparison_keeps_its_shape():
    path = ROOT / "benchmarks" / "results" / "planner-own-runs-h100-x4.csv"
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert {r["config"] for r in rows} == {"pd-1p1-1d1-pack", "pd-1p2-1d2-pack"}
    assert sum(r["fit"] == "collocated" for r in rows) == 9
    for r in rows:
        for m in ("med_ttft_ms", "med_tpot_ms", "out_tok_s"):
            meas, pred = float(r[f"{m}_measured"]), float(r[f"{m}_predicted"])
            assert float(r[f"{m}_error_pct"]) == pytest.approx((pred / meas - 1) * 100, abs=0.5)  # values rounded
            assert float(r[f"{m}_lo"]) <= pred <= float(r[f"{m}_hi"])
    note = path.with_suffix(".md").read_text()
    assert "benchmarks/planner_own_runs.py" in note and "eager" in note
    profile = json.loads(path.with_suffix(".profile.json").read_text())
    assert profile["hardware_id"] == HW and profile["model"] == MODEL
