"""Result and baseline files a user hands the tools by mistake: one line, exit 2, nothing changed.

``pdperf compare``, ``pdperf report`` and ``pdperf baseline show|add-run|remove-run|migrate`` take
run folders, point files and baseline files by path. Each is given a path that does not exist, a
folder with no points, a JSON file that is not what it wants and a truncated one; the gate is
given baselines of other hardware, a corrupt one and one of a newer schema. What must come back:
exit status 2 and one line naming the file and the fix, or, for two runs of different hardware,
the gate's "incomparable" naming both. ``pdperf`` runs in this process (an exception escaping
``main`` is the traceback a user would see, and fails the test as it is).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdperf.gate.store import baseline_path, write_baseline
from pdperf.report.synthetic import synthetic_point
from pdperf.results import PointResult, save_point
from tests.selftest.test_bad_input import cli

pytestmark = pytest.mark.selftest

CPU = "cpu-2c-test"
GPU = "h100-80gb-x4"


def point(hardware_id: str = CPU, seed: int = 0) -> PointResult:
    return synthetic_point("pd-1p1d", "isl128-osl8", 4, n=60, output_tokens=8, seed=seed, hardware_id=hardware_id)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A run folder and the wrong things a user might pass instead."""
    run = tmp_path / "run"
    save_point(run / "points" / "pd-1p1d__isl128-osl8__c4.json", point())
    other_hw = tmp_path / "run-h100"
    save_point(other_hw / "points" / "pd-1p1d__isl128-osl8__c4.json", point(GPU, seed=1))
    [baseline] = write_baseline(tmp_path / "baselines", [point(seed=2)])
    empty = tmp_path / "empty"
    empty.mkdir()
    not_point = tmp_path / "not-a-point.json"
    not_point.write_text(json.dumps({"hello": "world"}))
    truncated = tmp_path / "truncated.json"
    truncated.write_text(baseline.read_text()[:400])
    junk_run = tmp_path / "junk-run"
    (junk_run / "points").mkdir(parents=True)
    (junk_run / "points" / "x.json").write_text(json.dumps({"hello": "world"}))
    return {"run": run, "run-h100": other_hw, "baseline": baseline, "empty": empty, "not-a-point": not_point,
            "truncated": truncated, "junk-run": junk_run, "missing": tmp_path / "no-such-thing"}


def the_line(err: str, prefix: str = "error: ") -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


# (case id, argv with {name} for a path of ``files``, the prefix of the line, fragments it must hold)
CASES = [
    ("compare-missing", ["compare", "{missing}", "{run}"], "pdperf compare: ",
     ["{missing}: no such file or folder; pass a run folder (reports/<run-id>) or a point JSON"]),
    ("compare-no-points", ["compare", "{empty}", "{run}"], "pdperf compare: ",
     ["{empty}: no points/*.json; pass a run folder written by pdperf or a point JSON file"]),
    ("compare-not-a-point", ["compare", "{not-a-point}", "{run}"], "pdperf compare: ",
     ["{not-a-point}: not a pdperf point result (missing point_id, records, topology, workload); pass a run folder"]),
    ("compare-truncated", ["compare", "{truncated}", "{run}"], "pdperf compare: ",
     ["{truncated}: not JSON (", "pass a point result written by pdperf"]),
    ("compare-folder-of-non-points", ["compare", "{junk-run}", "{run}"], "pdperf compare: ",
     ["x.json: not a pdperf point result"]),
    ("report-missing", ["report", "{missing}"], "error: ",
     ["{missing}: no such run folder (expected reports/<run-id>/ with run.json and points/)"]),
    ("baseline-show-missing", ["baseline", "show", "--no-mde", "{missing}"], "error: ",
     ["{missing}: no such baseline file"]),
    ("baseline-show-a-point", ["baseline", "show", "--no-mde", "{run}/points/pd-1p1d__isl128-osl8__c4.json"],
     "error: ", ["c4.json: not a baseline file (no 'points' key)"]),
    ("baseline-show-truncated", ["baseline", "show", "--no-mde", "{truncated}"], "error: ",
     ["{truncated}: not valid JSON (", "restore it from git or re-record with --update-baselines"]),
    ("baseline-show-a-folder", ["baseline", "show", "--no-mde", "{empty}"], "error: ",
     ["{empty}: a folder, where a file is expected; pass a file (`pdperf baseline show -h`)"]),
    ("baseline-add-run-missing", ["baseline", "add-run", "--baselines-dir", "{empty}", "{missing}"], "error: ",
     ["{missing}: no such file or folder; pass a run folder (reports/<run-id>) or a point JSON"]),
    ("baseline-add-run-no-points", ["baseline", "add-run", "--baselines-dir", "{empty}", "{empty}"], "error: ",
     ["{empty}: no points/*.json; pass a run folder written by pdperf or a point JSON file"]),
    ("baseline-add-run-not-a-point", ["baseline", "add-run", "--baselines-dir", "{empty}", "{not-a-point}"],
     "error: ", ["{not-a-point}: not a pdperf point result"]),
    ("baseline-add-run-a-baseline", ["baseline", "add-run", "--baselines-dir", "{empty}", "{baseline}"],
     "error: ", ["{baseline}: not a pdperf point result"]),
    ("baseline-remove-run-missing", ["baseline", "remove-run", "{missing}", "c4", "2"], "error: ",
     ["{missing}: no such baseline file"]),
    ("baseline-remove-run-not-a-baseline", ["baseline", "remove-run", "{not-a-point}", "c4", "2"], "error: ",
     ["{not-a-point}: not a baseline file (no 'points' key)"]),
    ("baseline-remove-run-no-such-run", ["baseline", "remove-run", "{baseline}", "c4", "2"], "error: ",
     ["{baseline} c4: no run 2"]),
    ("baseline-migrate-missing", ["baseline", "migrate", "{missing}"], "error: ",
     ["{missing}: no such baseline file"]),
    ("baseline-migrate-no-baselines", ["baseline", "migrate", "{empty}"], "error: ",
     ["{empty}: no baseline files (<hardware_id>/<topology>/<workload>.json)"]),
    ("baseline-migrate-not-a-baseline", ["baseline", "migrate", "{not-a-point}"], "error: ",
     ["{not-a-point}: not a baseline file (no 'points' key)"]),
]


def _fill(text: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", str(path))
    return text


@pytest.mark.parametrize("argv,prefix,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wrong_path(files, argv, prefix, says):
    before = _snapshot(files["empty"].parent)
    code, out, err = cli(*[_fill(a, files) for a in argv])
    assert code == 2, out + err
    line = the_line(err, prefix)
    for fragment in says:
        assert _fill(fragment, files) in line, line
    assert _snapshot(files["empty"].parent) == before  # nothing written, nothing written over


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- what once was a traceback or a silent success ------------------------------------------------

def test_baseline_migrate_truncated(files):
    code, out, err = cli("baseline", "migrate", str(files["truncated"]))
    assert code == 2
    assert f"{files['truncated']}: not valid JSON" in the_line(err)


def test_report_folder_without_points(files):
    code, out, err = cli("report", str(files["empty"]))
    assert code == 2, out + err
    assert "no points/*.json" in the_line(err)
    assert not any(files["empty"].iterdir())  # no summary.html, no results.csv left in the user's folder


def test_report_folder_whose_points_are_not_points(files):
    code, out, err = cli("report", str(files["junk-run"]))
    assert code == 2, out + err
    assert "x.json: not a pdperf point result" in the_line(err)


# -- baselines the gate cannot use ---------------------------------------------------------------

def test_baseline_of_other_hardware_in_this_hardwares_folder(files, tmp_path):
    """A user copies another cluster's baselines under this hardware's key: refused, naming both keys."""
    [other] = write_baseline(tmp_path / "theirs", [point(GPU, seed=3)])
    mine = baseline_path(tmp_path / "copied", CPU, "pd-1p1d", "isl128-osl8")
    mine.parent.mkdir(parents=True)
    mine.write_text(other.read_text())
    code, out, err = cli("compare", str(files["run"]), "--baseline", "--baselines-dir", str(tmp_path / "copied"))
    assert code == 2, out + err
    assert the_line(err, "pdperf compare: ") == (f"pdperf compare: {mine}: holds hardware_id '{GPU}' but sits under "
                                                 f"'{CPU}'; move it to the folder of its hardware")


def test_runs_of_different_hardware_are_incomparable_naming_both(files):
    code, out, err = cli("compare", str(files["run"]), str(files["run-h100"]))
    assert code == 0 and err == "", err  # not a user error: the gate's answer, no verdict
    assert "incomparable" in out
    assert f"hardware differs: current '{GPU}', baseline '{CPU}'; baselines compare only within one hardware_id" in out
    assert "pass --allow-cross-hardware to see the numbers anyway" in out


@pytest.mark.parametrize("damage", ["truncated", "newer-schema", "no-hardware-id"])
def test_baseline_the_gate_cannot_read(files, tmp_path, damage):
    """The gate meets a corrupt baseline (a copy cut short, a newer pdperf's file, a hand edit):
    exit 2, the file and the fix; the file is left as it is."""
    path = baseline_path(tmp_path / "store", CPU, "pd-1p1d", "isl128-osl8")
    path.parent.mkdir(parents=True)
    data = json.loads(files["baseline"].read_text())
    text = {"truncated": files["baseline"].read_text()[:600],
            "newer-schema": json.dumps({**data, "schema_version": 3}),
            "no-hardware-id": json.dumps({k: v for k, v in data.items() if k != "hardware_id"})}[damage]
    path.write_text(text)
    code, out, err = cli("compare", str(files["run"]), "--baseline", "--baselines-dir", str(tmp_path / "store"))
    assert code == 2, out + err
    line = the_line(err, "pdperf compare: ")
    assert line.startswith(f"pdperf compare: {path}: ")
    assert {"truncated": "not valid JSON (", "newer-schema": "baseline schema_version 3 is not 1 or 2",
            "no-hardware-id": "no 'hardware_id'"}[damage] in line
    assert "re-record" in line
    assert path.read_text() == text
    code, out, err = cli("baseline", "show", "--no-mde", str(path))
    assert code == 2 and the_line(err).startswith(f"error: {path}: ")


def test_point_of_a_newer_schema(files, tmp_path):
    data = json.loads((files["run"] / "points" / "pd-1p1d__isl128-osl8__c4.json").read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**data, "schema_version": 3}))
    code, out, err = cli("compare", str(newer), str(files["run"]))
    assert code == 2, out + err
    assert the_line(err, "pdperf compare: ") == (
        f"pdperf compare: {newer}: result schema_version 3 is not one of (1, 2) (written by another pdperf "
        "version); re-run the point")
