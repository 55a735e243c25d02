"""Baseline bands: several recorded runs of a point, so that the gate knows the spread between
deployments of unchanged code (pdperf.gate.store: ``runs``, ``--add-baseline-runs``,
``pdperf baseline add-run``).

The case they exist for (4x H100, seventh GPU session): colloc-2xtp1 c4 decoded at p50 TPOT
18.9 ms in the run kept as the baseline and at 24.4 ms on a fresh deployment of the same code
(x1.29, beyond +15%, each run's own requests in close agreement). Synthetic points reproduce
it with the CPU limit (+50%): the band's first run at 10 ms, another at 13 ms; a new run at
16 ms (x1.6 of the first) is within the limit of the band's worst run, one at 21 ms is beyond it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from pdperf.cli import main as cli_main
from pdperf.gate import BaselineError, Gate, compare_point, judge_metric, load_baseline, load_thresholds, write_baseline
from pdperf.gate import store as bl
from pdperf.report.synthetic import synthetic_point
from pdperf.results import save_point

pytestmark = pytest.mark.selftest

CPU = "cpu-2c-test"


@pytest.fixture(scope="module")
def thresholds():
    return load_thresholds()


def point(*, seed: int, tpot_ms: float, started: str, n: int = 150, flags=()):
    p = synthetic_point("colloc", "w", 4, n=n, tpot_ms=tpot_ms, ttft_ms=50.0, output_tokens=8, sigma=0.1,
                        seed=seed, hardware_id=CPU, flags=flags)
    return dataclasses.replace(p, started_at=started, environment=p.environment.model_copy(update={"git_sha": f"sha{seed}"}))


def band_store(tmp_path, *tpots):
    """A store whose c4 entry has one run per TPOT (the first run's samples kept)."""
    for i, t in enumerate(tpots):
        write_baseline(tmp_path, [point(seed=i, tpot_ms=t, started=f"2026-11-27T1{i}:00:00+00:00")], add_run=True)
    b = load_baseline(tmp_path, CPU, "colloc", "w")
    return b.points["c4"], b.environment_of("c4")


def test_add_run_appends_keeps_the_first_runs_samples_and_is_idempotent(tmp_path):
    first = point(seed=0, tpot_ms=10, started="2026-11-27T10:00:00+00:00")
    [path] = write_baseline(tmp_path, [first])
    samples = json.loads(path.read_text())["points"]["c4"]["samples"]
    second = point(seed=1, tpot_ms=13, started="2026-11-27T11:00:00+00:00")
    write_baseline(tmp_path, [second], add_run=True)
    write_baseline(tmp_path, [second], add_run=True)  # the same run again: not a second time
    entry = load_baseline(tmp_path, CPU, "colloc", "w").points["c4"]
    assert entry.samples == samples
    assert [r.git_sha for r in entry.runs] == ["sha0", "sha1"]
    assert entry.band("tpot_ms", "p50") == pytest.approx([10, 13], rel=0.05)
    assert entry.band("tpot_ms", "p99.9") is None  # a statistic the runs do not keep
    # --update-baselines (add_run False) starts the band anew
    write_baseline(tmp_path, [point(seed=2, tpot_ms=11, started="2026-11-27T12:00:00+00:00")])
    assert len(json.loads(path.read_text())["points"]["c4"]["runs"]) == 1


def test_band_keeps_the_first_run_and_the_latest_others(tmp_path):
    entry, _ = band_store(tmp_path, *([10.0] + [11.0 + i for i in range(bl.MAX_BAND_RUNS + 2)]))
    runs = entry.runs
    assert len(runs) == bl.MAX_BAND_RUNS
    assert runs[0].git_sha == "sha0" and runs[-1].git_sha == f"sha{bl.MAX_BAND_RUNS + 2}"


def test_an_entry_from_before_bands_is_one_run_of_its_samples(tmp_path):
    [path] = write_baseline(tmp_path, [point(seed=0, tpot_ms=10, started="2026-11-27T10:00:00+00:00")])
    data = json.loads(path.read_text())
    del data["points"]["c4"]["runs"]
    data["schema_version"] = 1  # schema 1 as the code wrote it before bands: migrated on load
    path.write_text(json.dumps(data))
    entry = load_baseline(tmp_path, CPU, "colloc", "w").points["c4"]
    [run] = entry.runs
    assert run.stat("tpot_ms", "p50") == pytest.approx(10, rel=0.05)
    assert entry.band("tpot_ms", "p50") is None  # one run: no band, the old rule
    write_baseline(tmp_path, [point(seed=1, tpot_ms=12, started="2026-11-27T11:00:00+00:00")], add_run=True)
    entry = load_baseline(tmp_path, CPU, "colloc", "w").points["c4"]
    assert entry.band("tpot_ms", "p50") == pytest.approx([10, 12], rel=0.05)


def test_a_run_within_the_bands_spread_is_unchanged_beyond_it_regressed(tmp_path, thresholds):
    entry, env = band_store(tmp_path, 10.0, 13.0)
    within = compare_point(point(seed=5, tpot_ms=16, started="x"), entry, env, thresholds.resolve(CPU))
    v = next(v for v in within.verdicts if v.key == "p50 tpot_ms")
    assert v.ratio > 1.5 and v.p_value < 1e-6  # far from the first run, and significantly so ...
    assert v.verdict == "unchanged" and v.band_runs == 2  # ... but within the limit of the band's worst run
    assert "of the worst run" in v.message() and "2 baseline runs" in v.message()
    assert any("baseline band of 2 runs" in n for n in within.notes)
    beyond = compare_point(point(seed=6, tpot_ms=21, started="y"), entry, env, thresholds.resolve(CPU))
    v = next(v for v in beyond.verdicts if v.key == "p50 tpot_ms")
    assert v.verdict == "regressed" and beyond.status == "regressed", v.message()


def test_without_a_band_the_same_run_regresses(tmp_path, thresholds):
    entry, env = band_store(tmp_path, 10.0)
    g = compare_point(point(seed=5, tpot_ms=16, started="x"), entry, env, thresholds.resolve(CPU))
    assert next(v for v in g.verdicts if v.key == "p50 tpot_ms").verdict == "regressed"


def test_judge_metric_band_rule_both_directions():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(10, 0.2, 200)
    lower = Gate(metric="tpot_ms", statistic="p50", max_change=0.15, direction="lower-is-better")
    kw = dict(alpha=0.01, ci_level=0.95, resamples=300)
    assert judge_metric(lower, base * 1.3, base, band=[10, 12], **kw).verdict == "unchanged"
    assert judge_metric(lower, base * 1.45, base, band=[10, 12], **kw).verdict == "regressed"
    assert judge_metric(lower, base * 0.88, base, band=[10, 12], **kw).verdict == "unchanged"
    assert judge_metric(lower, base * 0.80, base, band=[10, 12], **kw).verdict == "improved"
    higher = Gate.model_construct(metric="output_tok_per_s", statistic="p50", max_change=0.15,
                                  direction="higher-is-better", min_samples=10)
    # higher is better: the worst run is the lowest
    assert judge_metric(higher, base * 0.8, base, band=[8, 10], **kw).verdict == "unchanged"
    assert judge_metric(higher, base * 0.6, base, band=[8, 10], **kw).verdict == "regressed"


def _run_folder(root, name, points):
    d = root / name
    for p in points:
        save_point(d / "points" / f"{p.id.replace('/', '__')}.json", p)
    (d / "run.json").write_text(json.dumps({"run_id": name}))
    return d


def test_cli_add_run_and_show(tmp_path, capsys):
    store = tmp_path / "store"
    write_baseline(store, [point(seed=0, tpot_ms=10, started="2026-11-27T10:00:00+00:00")])
    run = _run_folder(tmp_path, "run-1", [point(seed=1, tpot_ms=13, started="2026-11-27T11:00:00+00:00")])
    assert cli_main(["baseline", "add-run", str(run), "--baselines-dir", str(store)]) == 0
    out = capsys.readouterr().out
    assert "colloc/w.json" in out and "c4       2 runs" in out and "(x1.3" in out
    f = store / CPU / "colloc" / "w.json"
    assert cli_main(["baseline", "show", str(f)]) == 0
    assert "2 runs" in capsys.readouterr().out


def test_cli_add_run_refuses_a_flagged_point_and_writes_nothing(tmp_path, capsys):
    store = tmp_path / "store"
    [f] = write_baseline(store, [point(seed=0, tpot_ms=10, started="2026-11-27T10:00:00+00:00")])
    before = f.read_text()
    flagged = point(seed=1, tpot_ms=30, started="2026-11-27T11:00:00+00:00", flags=["client_loop_lag"])
    good = point(seed=2, tpot_ms=11, started="2026-11-27T12:00:00+00:00")
    run = _run_folder(tmp_path, "run-1", [good])
    save_point(tmp_path / "flagged.json", flagged)
    assert cli_main(["baseline", "add-run", str(run), str(tmp_path / "flagged.json"),
                     "--baselines-dir", str(store)]) == 2
    err = capsys.readouterr().err
    assert "client_loop_lag" in err and "Traceback" not in err and err.count("\n") == 1
    assert f.read_text() == before


@pytest.mark.parametrize("args, expected", [
    (["baseline", "add-run", "/nonexistent/run"], "no such file or folder"),
    (["baseline", "show", "/nonexistent.json"], "no such baseline file"),
])
def test_cli_bad_input_is_one_line_exit_2(args, expected, capsys):
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_run_of_another_configuration_is_refused_naming_the_key(tmp_path):
    first = point(seed=0, tpot_ms=10, started="2026-11-27T10:00:00+00:00")
    [path] = write_baseline(tmp_path, [first])
    before = path.read_text()
    compiled = point(seed=1, tpot_ms=6, started="2026-11-27T11:00:00+00:00")
    compiled.environment.engine_overrides = '{"enforce_eager": false}'
    with pytest.raises(BaselineError, match=r"engine_overrides '\{\"enforce_eager\": false\}' differs from the "
                                            r"baseline's '\(none\)'; a band holds runs of one configuration"):
        write_baseline(tmp_path, [compiled], add_run=True)
    beside = point(seed=2, tpot_ms=14, started="2026-11-27T12:00:00+00:00")
    beside.environment.co_resident = "pd-1p1-1d1"
    with pytest.raises(BaselineError, match="co_resident 'pd-1p1-1d1' differs"):
        write_baseline(tmp_path, [beside], add_run=True)
    assert path.read_text() == before
    # a model recorded now, against a baseline from before the key: unknown there, so accepted
    named = point(seed=3, tpot_ms=11, started="2026-11-27T13:00:00+00:00")
    named.environment.model = "llama-3.1-8b"
    write_baseline(tmp_path, [named], add_run=True)
    other_model = point(seed=4, tpot_ms=11, started="2026-11-27T14:00:00+00:00")
    other_model.environment.model = "llama-3.1-70b"
    write_baseline(tmp_path, [other_model], add_run=True)  # the entry (first run) still has no model
    assert len(load_baseline(tmp_path, CPU, "colloc", "w").points["c4"].runs) == 3
    # --update-baselines (no band) replaces whatever configuration was there
    write_baseline(tmp_path, [compiled])


def test_cli_remove_run_drops_one_run_and_keeps_the_first(tmp_path, capsys):
    entry, _ = band_store(tmp_path, 10.0, 13.0, 30.0)  # the third added by mistake
    f = tmp_path / CPU / "colloc" / "w.json"
    assert cli_main(["baseline", "show", "--runs", str(f)]) == 0
    assert "#3 2026-11-27T12:00:00+00:00, git sha2" in capsys.readouterr().out
    assert cli_main(["baseline", "remove-run", str(f), "c4", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed run 3 of c4 (2026-11-27T12:00:00+00:00, git sha2") and "2 runs" in out
    entry = load_baseline(tmp_path, CPU, "colloc", "w").points["c4"]
    assert [r.git_sha for r in entry.runs] == ["sha0", "sha1"]


@pytest.mark.parametrize("point_id, number, expected", [
    ("c4", 1, "run 1 holds the samples the gate tests against"),
    ("c4", 5, "no run 5; its band has runs 1-2"),
    ("c9", 2, "no point 'c9'; it has c4"),
])
def test_cli_remove_run_bad_input_is_one_line_exit_2(tmp_path, capsys, point_id, number, expected):
    band_store(tmp_path, 10.0, 13.0)
    f = tmp_path / CPU / "colloc" / "w.json"
    before = f.read_text()
    assert cli_main(["baseline", "remove-run", str(f), point_id, str(number)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert f.read_text() == before
