"""``python -m pdperf.planner``: user mistakes end in one ``error:`` line and exit status 2;
the happy paths write what they say; the committed reference-study outputs keep their shape."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from pdperf.planner.cli import PREDICT_COLUMNS, main, parse_config
from pdperf.planner.model import Deployment
from pdperf.planner.profiles import (
    DecodeParams,
    KVCacheParams,
    ModelParams,
    OverheadParams,
    PlannerError,
    PrefillParams,
    Profile,
    save_profile,
)
from pdperf.specs import ROOT, load_topology

pytestmark = pytest.mark.selftest

CAL_CSV = ("config,kind,prefill_or_collocated_replicas,prefill_or_collocated_tp,decode_replicas,decode_tp,gpus,"
           "concurrency,requests,med_ttft_ms,p99_ttft_ms,med_tpot_ms,p99_tpot_ms,p99_itl_ms,out_tok_s,req_s\n"
           "a,collocated,2,4,0,0,8,4,20,145,387,5.37,6.20,7.0,645,2.58\n")


@pytest.fixture
def profile_file(tmp_path):
    params = ModelParams(ref_tp=2, prefill=PrefillParams(ms_per_ktoken=10.0, tp_exponent=0.7),
                         decode=DecodeParams(step_ms=6.0, per_seq_ms_per_ktoken=0.05),
                         kv_cache=KVCacheParams(weights_gb=65.0, bytes_per_token=73728.0),
                         overheads=OverheadParams(fixed_ms=80.0, jitter_ms=40.0, convoy=0.3))
    path = tmp_path / "profile.json"
    save_profile(path, Profile(hardware_id="h100-x8", model="gpt-oss-120b", params=params))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, expect", [
    (["calibrate", "--csv", "{tmp}/none.csv", "--isl", "5000", "--osl", "250", "--hardware-id", "h", "--model",
      "gpt-oss-120b", "--out", "{tmp}/p.json"], "none.csv: no such calibration CSV"),
    (["calibrate", "--csv", "{tmp}/bad.csv", "--isl", "5000", "--osl", "250", "--hardware-id", "h", "--model",
      "gpt-oss-120b", "--out", "{tmp}/p.json"], "missing column(s) med_tpot_ms"),
    (["calibrate", "--csv", "{tmp}/good.csv", "--isl", "5000", "--osl", "250", "--out", "{tmp}/p.json"],
     "pass --hardware-id"),
    (["calibrate", "--csv", "{tmp}/good.csv", "--isl", "5000", "--osl", "250", "--hardware-id", "h", "--model",
      "gpt-oss-120b", "--out", "{tmp}/p.json"], "a profile needs at least 4"),
    (["search", "--profile", "{profile}", "--isl", "5000", "--osl", "250", "--concurrency", "16", "--gpus", "32",
      "--nodes", "1"], "--gpus 32: more than the 8 GPUs"),
    (["search", "--profile", "{profile}", "--isl", "5000", "--osl", "250", "--concurrency", "16", "--gpus", "8",
      "--slo", "p99_queue_ms <= 100"], "predicts ttft_ms and tpot_ms only"),
    (["predict", "--profile", "{profile}", "--config", "4P-TP4:1D-TP2", "--isl", "5000", "--osl", "250",
      "--concurrency", "4"], "prefill TP 4 > decode TP 2"),
    (["predict", "--profile", "{profile}", "--config", "banana", "--isl", "5000", "--osl", "250",
      "--concurrency", "4"], "--config banana: not a configuration"),
    (["predict", "--profile", "{tmp}/missing.json", "--config", "2xTP4", "--isl", "5000", "--osl", "250",
      "--concurrency", "4"], "missing.json: no such profile"),
    (["predict", "--profile", "{profile}", "--config", "2xTP4", "--isl", "5000", "--osl", "250"],
     "--concurrency LIST"),
    (["predict", "--profile", "{profile}", "--config", "2xTP4", "--isl", "5000", "--osl", "250", "--rate", "2",
      "--requests-per-slot", "5"], "--requests-per-slot describes a closed-loop run"),
    (["predict", "--profile", "{profile}", "--config", "2xTP4", "--isl", "5000", "--osl", "250",
      "--concurrency", "4,x"], "--concurrency '4,x': expected numbers"),
    (["predict", "--nonsense"], "the following arguments are required"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, profile_file, capsys, argv, expect):
    (tmp_path / "bad.csv").write_text(CAL_CSV.replace("med_tpot_ms", "tpot"))
    (tmp_path / "good.csv").write_text(CAL_CSV)
    argv = [a.format(tmp=tmp_path, profile=profile_file) for a in argv]
    assert main(argv) == 2
    assert expect in one_error_line(capsys)


def test_module_entry_point_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pdperf.planner", "predict", "--profile", str(tmp_path / "x.json"),
                           "--config", "2xTP4", "--isl", "10", "--osl", "10", "--concurrency", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr


def test_predict_writes_csv_with_intervals(tmp_path, profile_file, capsys):
    out = tmp_path / "pred.csv"
    assert main(["predict", "--profile", str(profile_file), "--config", "1P-TP2:3D-TP2", "--config", "colloc-2xtp4",
                 "--isl", "5000", "--osl", "250", "--concurrency", "4,64", "--requests-per-slot", "5",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(PREDICT_COLUMNS)
    assert [r["config"] for r in rows] == ["1P-TP2:3D-TP2"] * 2 + ["2xTP4"] * 2
    r = rows[1]
    assert r["gpus"] == "8" and r["concurrency"] == "64" and r["decode_replicas"] == "3"
    assert float(r["med_ttft_ms_lo"]) <= float(r["med_ttft_ms"]) <= float(r["med_ttft_ms_hi"])
    assert "no calibration record" in r["notes"]


def test_search_writes_ranking_and_topologies(tmp_path, profile_file, capsys):
    out = tmp_path / "search.txt"
    topo_dir = tmp_path / "topos"
    assert main(["search", "--profile", str(profile_file), "--isl", "5000", "--osl", "250", "--concurrency", "16",
                 "--slo", "p99_ttft_ms <= 2000", "--slo", "p99_tpot_ms <= 20", "--gpus", "8", "--tps", "2,4",
                 "--out", str(out), "--write-topologies", str(topo_dir), "--write-count", "2"]) == 0
    text = out.read_text()
    assert text.startswith("# python -m pdperf.planner search --profile")
    assert "layouts using all 8 GPUs" in text
    written = sorted(topo_dir.glob("*.yaml"))
    assert len(written) == 2 and all(load_topology(p).gpus <= 8 for p in written)


def test_parse_config_forms():
    assert parse_config("2xTP4") == Deployment.collocated(2, 4)
    assert parse_config("colloc-4xtp2") == Deployment.collocated(4, 2)
    assert parse_config("1P-TP2:3D-TP2") == Deployment.pd(1, 2, 3, 2)
    assert parse_config("1p-tp4:1d-tp4-spread") == Deployment.pd(1, 4, 1, 4, "spread")
    assert parse_config("pd-2p2-1d4-pack") == Deployment.pd(2, 2, 1, 4)
    assert parse_config("pd-1p4-1d4-spread-efa") == Deployment.pd(1, 4, 1, 4, "spread")  # a topologies/ name
    with pytest.raises(PlannerError):
        parse_config("3P-TP4:1D-TP2")


def test_committed_reference_study_outputs_keep_their_shape():
    pred = ROOT / "benchmarks" / "results" / "planner-predictions-reference-study.csv"
    rows = list(csv.DictReader(pred.open()))
    assert {r["config"] for r in rows} == {"1P-TP2:2D-TP2", "1P-TP2:3D-TP2", "2P-TP2:1D-TP2", "3P-TP2:1D-TP2",
                                           "2P-TP2:1D-TP4"}
    assert sorted({int(r["concurrency"]) for r in rows}) == [4, 8, 16, 32, 48, 64] and len(rows) == 30
    for col in ("med_ttft_ms", "p99_ttft_ms", "med_tpot_ms", "out_tok_s"):
        assert all(float(r[f"{col}_lo"]) <= float(r[col]) <= float(r[f"{col}_hi"]) for r in rows)
    search_txt = ROOT / "benchmarks" / "results" / "planner-search-reference-study.txt"
    assert search_txt.read_text().startswith("# python -m pdperf.planner search ")


def test_run_folders_calibrate_and_report_api(tmp_path, capsys):
    # The suite's own point files (synthetic ones with known timings) -> a profile; then the
    # report's entry point predicts one of the measured points with an interval.
    from pdperf.planner import load_profile, predict_for_result
    from pdperf.report.synthetic import synthetic_point
    from pdperf.results import save_point

    env = {"hardware_id": "h100-x4", "model": "llama-3.1-8b"}
    run = tmp_path / "run"
    points = []
    for topo, gpus in (("pd-1p2-1d2-pack", 4), ("colloc-2xtp2", 4)):
        for c in (4, 16, 32):
            ttft, tpot = 60 + 3 * c, 6 + 0.2 * c
            e2e_s = (ttft + 15 * tpot) / 1000  # requests sent e2e / c apart: a closed loop of c (Little's law)
            p = synthetic_point(topo, "gpu-small-isl1024-osl256", c, gpus=gpus, n=5 * c, ttft_ms=ttft,
                                tpot_ms=tpot, sigma=0.1, environment=env, spacing_s=e2e_s / c)
            save_point(run / "points" / f"{topo}__c{c}.json", p)
            points.append(p)
    out = tmp_path / "store"
    assert main(["calibrate", "--runs", str(run), "--store", str(out), "--bootstrap", "1", "--quiet"]) == 0
    assert "h100-x4 / llama-3.1-8b" in capsys.readouterr().out
    prof = load_profile(out, hardware_id="h100-x4", model="llama-3.1-8b")
    cmp = predict_for_result(prof, points[1])
    assert cmp.measured.deployment == Deployment.pd(1, 2, 1, 2) and cmp.measured.point.value == 16
    assert cmp.measured.point.isl == 128 and cmp.measured.point.osl == 16
    iv = cmp.predicted.med_tpot_ms
    assert iv.lo <= cmp.predicted.prediction.med_tpot_ms <= iv.hi
    assert abs(cmp.error_pct("med_tpot_ms")) < 25 and abs(cmp.error_pct("out_tok_s")) < 25
    # a point whose topology has no spec is a clear error, not a crash
    stray = synthetic_point("no-such-topology", environment=env)
    with pytest.raises(PlannerError, match="no-such-topology"):
        predict_for_result(prof, stray)


def test_run_folder_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "p.json")]) == 2
    assert "no points/*.json" in one_error_line(capsys)
