"""The baseline store, the thresholds file and the regression gate, on synthetic points.

Points are built from known timings (pdperf.report.synthetic): a point made with
``tpot_ms=20`` against one made with ``tpot_ms=10`` is a 2x TPOT regression by construction,
so each test knows the right verdict. Also: the compare CLI's output and exit codes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pdperf.compare import main as compare_main
from pdperf.gate import (
    BaselineError,
    Gate,
    GateResult,
    baseline_path,
    compare_point,
    gate_point,
    judge_metric,
    load_baseline,
    load_thresholds,
    write_baseline,
)
from pdperf.gate import thresholds as bl
from pdperf.gate.store import new_entry, point_samples
from pdperf.report.synthetic import synthetic_point
from pdperf.results import Environment, save_point

pytestmark = pytest.mark.selftest

CPU = "cpu-2c-test"
GPU = "h100-80gb-x4"


@pytest.fixture(scope="module")
def thresholds():
    return load_thresholds()


def point(*, seed: int = 0, tpot_ms: float = 10.0, ttft_ms: float = 50.0, hardware_id: str = CPU, n: int = 150,
          point_value: int = 4, sigma: float = 0.3, **kw):
    return synthetic_point("pd-1p1d", "isl128-osl8", point_value, n=n, tpot_ms=tpot_ms, ttft_ms=ttft_ms,
                           output_tokens=8, sigma=sigma, seed=seed, hardware_id=hardware_id, **kw)


def entry_of(p):
    return new_entry(p)


# --------------------------------------------------------------------------- store


def test_baseline_path_layout_and_slug_check(tmp_path):
    assert baseline_path(tmp_path, CPU, "pd-1p1d", "isl128-osl8") == tmp_path / CPU / "pd-1p1d" / "isl128-osl8.json"
    with pytest.raises(BaselineError, match="hardware_id '../etc' is not a slug"):
        baseline_path(tmp_path, "../etc", "pd-1p1d", "w")


def test_write_then_load_roundtrip_and_merge(tmp_path):
    c4, c16 = point(seed=1, point_value=4), point(seed=2, point_value=16)
    [path] = write_baseline(tmp_path, [c4])
    assert path == baseline_path(tmp_path, CPU, "pd-1p1d", "isl128-osl8")
    data = json.loads(path.read_text())
    assert set(data) == {"schema_version", "hardware_id", "environment", "updated_at", "points", "status",
                         "retired_reason"}
    assert data["schema_version"] == 2 and data["status"] == "active"
    assert data["hardware_id"] == CPU and list(data["points"]) == ["c4"]
    stored = data["points"]["c4"]
    assert set(stored["samples"]) == set(bl.SAMPLED_METRICS)
    assert len(stored["samples"]["ttft_ms"]) == 150 and len(stored["samples"]["itl_ms"]) == 150 * 7
    assert stored["summary"]["requests_ok"] == 150

    write_baseline(tmp_path, [c16])
    b = load_baseline(tmp_path, CPU, "pd-1p1d", "isl128-osl8")
    assert b is not None and sorted(b.points) == ["c16", "c4"]  # merged, not replaced
    newer = point(seed=3, point_value=4)
    write_baseline(tmp_path, [newer])
    b = load_baseline(tmp_path, CPU, "pd-1p1d", "isl128-osl8")
    assert b.points["c4"].samples["ttft_ms"] == point_samples(newer)["ttft_ms"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind


def test_samples_are_capped_by_even_subsampling(tmp_path):
    p = point(n=200)  # 1400 ITL samples
    capped = point_samples(p, cap=500)
    assert len(capped["itl_ms"]) == 500 and len(capped["ttft_ms"]) == 200
    assert capped == point_samples(p, cap=500)  # deterministic
    itl = np.sort(np.concatenate([np.diff(r.chunk_times_s) * 1000 for r in p.records]))
    assert capped["itl_ms"][0] == pytest.approx(itl[0]) and capped["itl_ms"][-1] == pytest.approx(itl[-1])


def test_write_refuses_bad_points_before_writing_anything(tmp_path):
    good = point(seed=1)
    no_hw = point(seed=2)
    no_hw.environment.hardware_id = None
    with pytest.raises(BaselineError, match="no 'hardware_id'"):
        write_baseline(tmp_path, [good, no_hw])
    flagged = point(seed=3, flags=["replica_restart_during_load"])
    with pytest.raises(BaselineError, match="replica_restart_during_load.*none was written.*restarted while the point ran"):
        write_baseline(tmp_path, [good, flagged])
    lagged = point(seed=5, flags=["client_loop_lag"])  # what a busy 2-core machine gives: advice a user can act on
    with pytest.raises(BaselineError, match="event loop lagged.*re-run the point when it is quiet") as e:
        write_baseline(tmp_path, [lagged])
    assert "allow_flagged" not in str(e.value)  # not an option a pytest user has
    all_failed = point(seed=4, n=0, errors=5)
    with pytest.raises(BaselineError, match="no successful measured request"):
        write_baseline(tmp_path, [all_failed])
    assert not any(tmp_path.rglob("*.json"))
    assert write_baseline(tmp_path, [flagged], allow_flagged=True)


def test_load_baseline_missing_corrupt_and_old_schema(tmp_path):
    assert load_baseline(tmp_path, CPU, "pd-1p1d", "isl128-osl8") is None
    path = baseline_path(tmp_path, CPU, "pd-1p1d", "isl128-osl8")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(BaselineError, match=re.escape(str(path)) + ": not valid JSON"):
        load_baseline(tmp_path, CPU, "pd-1p1d", "isl128-osl8")
    path.write_text(json.dumps({"schema_version": 0, "hardware_id": CPU, "points": {}}))
    with pytest.raises(BaselineError, match="schema_version 0 is not 1 or 2; re-record"):
        load_baseline(tmp_path, CPU, "pd-1p1d", "isl128-osl8")


# --------------------------------------------------------------------------- thresholds


def test_repo_thresholds_validate_and_cpu_override_applies(thresholds):
    gpu = thresholds.resolve(GPU)
    cpu = thresholds.resolve("cpu-2c-amd-epyc")
    assert gpu.source == "default" and cpu.source == "hardware 'cpu-*'"
    by_key = {g.key: g for g in cpu.gates}
    assert {g.key for g in gpu.gates} == set(by_key)
    for g in cpu.gates:  # generous, and still below +100% so that a 2x slowdown is beyond every limit
        assert 0.5 <= g.max_change < 1.0
        assert g.max_change >= {x.key: x for x in gpu.gates}[g.key].max_change
    assert by_key["p99 ttft_ms"].min_samples == 100 and by_key["p50 ttft_ms"].min_samples == 30


def _write_yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "thresholds.yaml"
    p.write_text(text)
    return p


BASE_YAML = """schema_version: 1
alpha: 0.01
ci_level: 0.99
gates:
  - {metric: ttft_ms, statistic: p50, max_change: 0.25, direction: lower-is-better}
"""


def test_thresholds_errors_name_file_and_key(tmp_path):
    p = _write_yaml(tmp_path, BASE_YAML + "alhpa: 0.05\n")
    with pytest.raises(BaselineError, match=re.escape(str(p)) + r": invalid thresholds\n  alhpa: unknown key"):
        load_thresholds(p)
    p = _write_yaml(tmp_path, BASE_YAML.replace("lower-is-better", "higher-is-better"))
    with pytest.raises(BaselineError, match=r"gates\.0: .*ttft_ms is lower-is-better"):
        load_thresholds(p)
    p = _write_yaml(tmp_path, BASE_YAML.replace("ttft_ms", "tftt_ms"))
    with pytest.raises(BaselineError, match=r"gates\.0\.metric: .*'tftt_ms' has no per-request samples"):
        load_thresholds(p)
    p = _write_yaml(tmp_path, BASE_YAML.replace("p50", "median"))
    with pytest.raises(BaselineError, match=r"gates\.0\.statistic: .*expected 'mean' or a percentile"):
        load_thresholds(p)
    p = _write_yaml(tmp_path, BASE_YAML + "  - {metric: ttft_ms, statistic: p50, max_change: 0.3, "
                                          "direction: lower-is-better}\n")
    with pytest.raises(BaselineError, match="p50 ttft_ms listed more than once"):
        load_thresholds(p)
    with pytest.raises(BaselineError, match="no such thresholds file"):
        load_thresholds(tmp_path / "absent.yaml")


def test_hardware_override_can_drop_and_add_gates(tmp_path):
    p = _write_yaml(tmp_path, BASE_YAML + """hardware:
  - match: "cpu-*"
    alpha: 0.001
    gates:
      - {metric: ttft_ms, statistic: p50, enabled: false}
      - {metric: tpot_ms, statistic: p50, max_change: 0.6, direction: lower-is-better}
""")
    t = load_thresholds(p)
    cpu = t.resolve(CPU)
    assert cpu.alpha == 0.001 and [g.key for g in cpu.gates] == ["p50 tpot_ms"]
    assert [g.key for g in t.resolve(GPU).gates] == ["p50 ttft_ms"]
    bad = _write_yaml(tmp_path, BASE_YAML + """hardware:
  - match: "cpu-*"
    gates:
      - {metric: tpot_ms, statistic: p99, max_change: 0.6}
""")
    with pytest.raises(BaselineError, match="not in the default gates, so it needs max_change and direction"):
        load_thresholds(bad)


# --------------------------------------------------------------------------- gate


def test_different_hardware_is_refused_naming_both(thresholds):
    base, cur = point(seed=1, hardware_id=GPU), point(seed=2, hardware_id=CPU)
    g = compare_point(cur, entry_of(base), base.environment, thresholds)
    assert g.status == "incomparable" and not g.verdicts
    assert f"current '{CPU}'" in g.reason and f"baseline '{GPU}'" in g.reason
    assert g.message().startswith("pd-1p1d/isl128-osl8/c4: incomparable: hardware differs")
    g = compare_point(cur, entry_of(base), base.environment, thresholds, allow_cross_hardware=True)
    assert g.status == "unchanged" and any("hardware differs" in n for n in g.notes)


def test_different_backend_is_refused(thresholds):
    base, cur = point(seed=1), point(seed=2)
    base.environment.backend, cur.environment.backend = "ray", "vllm"
    g = compare_point(cur, entry_of(base), base.environment, thresholds)
    assert g.status == "incomparable" and not g.verdicts
    assert "backend differs: current 'vllm', baseline 'ray'" in g.reason
    g = compare_point(cur, entry_of(base), base.environment, thresholds, allow_cross_hardware=True)
    assert g.status == "unchanged" and any("backend differs" in n for n in g.notes)


def test_2x_tpot_regression_is_caught_with_cpu_thresholds(thresholds):
    base, cur = point(seed=1, tpot_ms=10), point(seed=2, tpot_ms=20)
    g = compare_point(cur, entry_of(base), base.environment, thresholds)
    assert g.status == "regressed" and g.regressed
    verdicts = {v.key: v for v in g.verdicts}
    for key in ("p50 tpot_ms", "p99 tpot_ms", "p50 itl_ms"):
        assert verdicts[key].verdict == "regressed", verdicts[key].message()
    assert verdicts["p50 ttft_ms"].verdict == "unchanged"
    v = verdicts["p99 tpot_ms"]
    assert v.ratio_ci[0] > 1 and v.p_value < 0.01 and v.threshold == 0.75
    assert re.fullmatch(r"p99 tpot_ms [\d.]+ -> [\d.]+ ms \(x\d\.\d\d, CI [\d.]+-[\d.]+, p[=<][\de.-]+\) "
                        r"exceeds \+75%: regressed", v.message()), v.message()
    assert "p99 tpot_ms" in g.message() and g.message().startswith("pd-1p1d/isl128-osl8/c4: ")


def test_reruns_of_the_same_distribution_are_not_flagged(thresholds):
    base = point(seed=10, sigma=0.35)
    for seed in (11, 12, 13):
        g = compare_point(point(seed=seed, sigma=0.35), entry_of(base), base.environment, thresholds)
        assert g.status == "unchanged", g.message()


def test_improvement_is_symmetric(thresholds):
    base, cur = point(seed=1, tpot_ms=20), point(seed=2, tpot_ms=8)
    g = compare_point(cur, entry_of(base), base.environment, thresholds)
    assert g.status == "improved"
    v = next(v for v in g.verdicts if v.key == "p50 tpot_ms")
    assert v.verdict == "improved" and "beyond -33%" in v.message()


def test_too_few_samples_is_insufficient(thresholds):
    base, cur = point(seed=1, n=20), point(seed=2, n=20, tpot_ms=30)
    g = compare_point(cur, entry_of(base), base.environment, thresholds)
    assert {v.verdict for v in g.verdicts if v.metric in ("ttft_ms", "e2e_ms")} == {"insufficient"}
    assert g.status == "regressed"  # ITL has 20 x 7 = 140 samples: enough to judge
    tiny_base, tiny_cur = point(seed=1, n=8), point(seed=2, n=8)
    g = compare_point(tiny_cur, entry_of(tiny_base), tiny_base.environment, thresholds)
    assert g.status == "unchanged"  # itl p50 judged (56 samples), the rest insufficient
    v = next(v for v in g.verdicts if v.key == "p50 ttft_ms")
    assert v.verdict == "insufficient" and "8 current / 8 baseline samples, needs 30" in v.message()


def test_missing_entry_and_missing_metric_samples(thresholds):
    cur = point(seed=2)
    g = compare_point(cur, None, Environment(hardware_id=CPU), thresholds)
    assert g.status == "missing" and "--update-baselines" in g.reason
    g = compare_point(cur, new_entry(cur).model_copy(update={"samples": {}}), Environment(hardware_id=CPU), thresholds)
    assert g.status == "insufficient" and "has no ttft_ms samples" in g.reason


def test_a_tail_swing_alone_is_not_a_regression(thresholds):
    gate = Gate(metric="ttft_ms", statistic="p99", max_change=0.9, direction="lower-is-better", min_samples=100)
    rng = np.random.default_rng(0)
    base = rng.uniform(30, 40, 200)
    cur = base.copy()
    cur[np.argsort(cur)[-3:]] *= 3  # p99 more than doubles, the bulk does not move
    v = judge_metric(gate, cur, base, alpha=0.01, ci_level=0.99, resamples=1000)
    assert v.ratio > 1.9 and v.p_value > 0.5
    assert v.verdict == "unchanged" and "not significant" in v.reason


def test_higher_is_better_direction():
    gate = Gate.model_construct(metric="output_tok_per_s", statistic="mean", max_change=0.25,
                                direction="higher-is-better", min_samples=10)
    rng = np.random.default_rng(1)
    base = rng.normal(100, 5, 200)
    drop = judge_metric(gate, base * 0.5, base, alpha=0.01, ci_level=0.99, resamples=500)
    assert drop.verdict == "regressed" and "exceeds -20%" in drop.reason
    rise = judge_metric(gate, base * 1.5, base, alpha=0.01, ci_level=0.99, resamples=500)
    assert rise.verdict == "improved" and "beyond +25%" in rise.reason


def test_gate_result_roundtrip(thresholds):
    base, cur = point(seed=1, tpot_ms=10), point(seed=2, tpot_ms=20)
    g = compare_point(cur, entry_of(base), base.environment, thresholds)
    d = json.loads(json.dumps(g.to_dict()))
    assert d["message"] == g.message() and d["verdicts"][0]["message"]
    back = GateResult.from_dict(d)
    assert back.message() == g.message() and back.verdicts[0].ratio_ci == g.verdicts[0].ratio_ci


def test_gate_point_reads_the_store_and_notes_environment_changes(tmp_path, thresholds):
    base = point(seed=1, environment={"hardware_id": CPU, "vllm_version": "0.32.0"})
    write_baseline(tmp_path, [base])
    cur = point(seed=2, tpot_ms=25, environment={"hardware_id": CPU, "vllm_version": "0.33.0"})
    g = gate_point(tmp_path, cur, thresholds)
    assert g.status == "regressed"
    assert "environment differs: vllm_version 0.32.0 -> 0.33.0" in g.notes
    other = point(seed=2, point_value=64)
    assert gate_point(tmp_path, other, thresholds).status == "missing"


# --------------------------------------------------------------------------- compare CLI


def _run_folder(root: Path, name: str, points) -> Path:
    for p in points:
        save_point(root / name / "points" / f"{p.point_id}.json", p)
    return root / name


def test_compare_cli_table_and_exit_codes(tmp_path, capsys):
    a = _run_folder(tmp_path, "A", [point(seed=1)])
    b = _run_folder(tmp_path, "B", [point(seed=2)])
    c = _run_folder(tmp_path, "C", [point(seed=3, tpot_ms=20)])
    assert compare_main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "p99 tpot_ms" in out and "unchanged" in out and "regressed" not in out
    html = tmp_path / "cmp.html"
    assert compare_main([str(a), str(b), str(c), "--html", str(html)]) == 1
    out = capsys.readouterr().out
    assert f"== {c} vs {a}: 1 regressed" in out
    assert re.search(r"pd-1p1d/isl128-osl8/c4: p50 tpot_ms .* exceeds \+50%: regressed", out)
    text = html.read_text()
    assert "<svg" in text and "regressed" in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")


def test_compare_cli_single_point_files_with_different_ids(tmp_path, capsys):
    pd = point(seed=1)
    co = synthetic_point("collocated-2x", "isl128-osl8", 4, n=150, output_tokens=8, seed=2, hardware_id=CPU)
    save_point(tmp_path / "pd.json", pd)
    save_point(tmp_path / "co.json", co)
    assert compare_main([str(tmp_path / "co.json"), str(tmp_path / "pd.json")]) == 0
    assert f"{pd.id} vs {co.id}" in capsys.readouterr().out


def test_compare_cli_across_topologies_pairs_by_load_point(tmp_path, capsys):
    pd = [point(seed=1, point_value=4), point(seed=2, point_value=16)]
    co = [synthetic_point("collocated-2x", "isl128-osl8", c, n=150, output_tokens=8, seed=c, hardware_id=CPU)
          for c in (4, 16, 64)]
    a, b = _run_folder(tmp_path, "colloc", co), _run_folder(tmp_path, "pd", pd)
    assert compare_main([str(a), str(b)]) == 2
    assert "share no point id" in (err := capsys.readouterr().err) and "--across-topologies" in err
    assert compare_main([str(a), str(b), "--across-topologies"]) in (0, 1)
    out = capsys.readouterr().out
    assert "pd-1p1d/isl128-osl8/c4 vs collocated-2x/isl128-osl8/c4" in out
    assert "pd-1p1d/isl128-osl8/c16 vs collocated-2x/isl128-osl8/c16" in out and "/c64" not in out
    both = tmp_path / "both"  # two topologies at one load point: which to pair would be a guess
    for p in (co[0], pd[0]):
        save_point(both / "points" / f"{p.topology}-{p.point_id}.json", p)
    assert compare_main([str(a), str(both), "--across-topologies"]) == 2
    err = capsys.readouterr().err
    assert "are at isl128-osl8/c4" in err and err.count("\n") == 1


def test_compare_cli_baseline_mode(tmp_path, capsys):
    store = tmp_path / "store"
    write_baseline(store, [point(seed=1)])
    run = _run_folder(tmp_path, "run", [point(seed=2, tpot_ms=25)])
    assert compare_main([str(run), "--baseline", "--baselines-dir", str(store)]) == 1
    assert "regressed" in capsys.readouterr().out


@pytest.mark.parametrize("make_bad, expected", [
    (lambda d: d / "absent", "no such file or folder"),
    (lambda d: (d / "x.txt").write_text("hello") and d / "x.txt", "not JSON"),
    (lambda d: (d / "x.json").write_text('{"a": 1}') and d / "x.json", "not a pdperf point result"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no points/*.json"),
])
def test_compare_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, make_bad, expected):
    good = tmp_path / "good.json"
    save_point(good, point(seed=1))
    bad = make_bad(tmp_path)
    assert compare_main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_compare_cli_schema_mismatch(tmp_path, capsys):
    good = tmp_path / "good.json"
    save_point(good, point(seed=1))
    old = json.loads(good.read_text())
    old["schema_version"] = 0
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert compare_main([str(good), str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err
    assert "schema_version 0 is not one of (1, 2)" in err and err.count("\n") == 1


def test_other_backend_records_beside_the_ray_baseline_and_gates_against_its_own(tmp_path, thresholds):
    ray_pt, vllm_pt = point(seed=1), point(seed=2, tpot_ms=5.0)
    ray_pt.environment.backend, vllm_pt.environment.backend = "ray", "vllm"
    [ray_path] = write_baseline(tmp_path, [ray_pt])
    [vllm_path] = write_baseline(tmp_path, [vllm_pt])
    assert ray_path == tmp_path / CPU / "pd-1p1d" / "isl128-osl8.json"
    assert vllm_path == tmp_path / CPU / "pd-1p1d" / "isl128-osl8.vllm.json"
    assert load_baseline(tmp_path, CPU, "pd-1p1d", "isl128-osl8").environment_of("c4").backend == "ray"
    again = point(seed=3, tpot_ms=5.0)
    again.environment.backend = "vllm"
    assert gate_point(tmp_path, again, thresholds).status == "unchanged"  # against the vllm file, not the 2x slower ray one


@pytest.mark.parametrize("update,record_missing,status,writes", [
    (True, False, None, True),            # --update-baselines: every point, the gate does not run
    (False, True, "missing", True),       # --record-missing-baselines: a point without a baseline
    (False, True, "unchanged", False),    # ... never one that has a baseline
    (False, True, "regressed", False),
    (False, True, "incomparable", False),  # a baseline of other hardware is not this hardware's gap
    (False, False, "missing", False),     # plain gating: missing is a skip with the reason
])
def test_which_points_a_run_writes_as_baselines(update, record_missing, status, writes):
    from fixtures.reporting import writes_baseline

    assert writes_baseline(update, record_missing, status) is writes


def test_pdperf_compare_takes_its_options_first(tmp_path, capsys):
    # `pdperf compare -h` / `pdperf compare --across-topologies A B` were refused by the top-level
    # parser ("unrecognized arguments"): options before the run folders reach compare's own parser
    from pdperf.cli import main as cli_main
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", "-h"])
    assert e.value.code == 0 and "usage: pdperf compare" in capsys.readouterr().out
    a = _run_folder(tmp_path, "A", [point(seed=1)])
    b = _run_folder(tmp_path, "B", [point(seed=2)])
    html = tmp_path / "c.html"
    assert cli_main(["compare", "--html", str(html), str(a), str(b)]) == 0 and html.exists()
    assert cli_main(["compare", str(a), str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith("pdperf compare: ")
