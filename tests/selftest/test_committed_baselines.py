"""Every committed baseline and thresholds file loads through the typed store (schema 2), sits in
the folder of its hardware, and is gated or retired as the repository says."""

from __future__ import annotations

import pytest

from pdperf.gate import gate_point, load_baseline_file, load_thresholds
from pdperf.gate.store import BASELINE_SCHEMA_VERSION, committed_baseline_files
from pdperf.gate.thresholds import BASELINE_ROOT, THRESHOLDS_PATH
from pdperf.report.synthetic import synthetic_point

pytestmark = pytest.mark.selftest

FILES = committed_baseline_files(BASELINE_ROOT)


def test_there_are_committed_baselines():
    assert len(FILES) >= 9 and all(f.suffix == ".json" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(BASELINE_ROOT)) for f in FILES])
def test_committed_baseline_loads_as_schema_2(path):
    raw_version = __import__("json").loads(path.read_text())["schema_version"]
    assert raw_version == BASELINE_SCHEMA_VERSION, f"{path}: migrate it (pdperf baseline migrate)"
    b = load_baseline_file(path)
    assert b.hardware_id == path.parts[-3]
    assert b.points and all(e.runs and e.samples for e in b.points.values())
    for pid, e in b.points.items():
        assert e.summary.requests_ok > 0, pid
        assert e.environment.hardware_id == b.hardware_id


def test_the_eager_h100_baselines_are_history_only(tmp_path):
    eager = [f for f in FILES if f.parts[-3] == "h100-x4"]
    assert eager and all(load_baseline_file(f).retired for f in eager)
    assert all("eager" in (load_baseline_file(f).retired or "") for f in eager)
    # a run on that hardware finds no baseline to gate against, and is told why and what to do
    p = synthetic_point("colloc-2xtp1", "gpu-small-isl1024-osl256", 4, hardware_id="h100-x4")
    g = gate_point(BASELINE_ROOT, p, load_thresholds())
    assert g.status == "missing" and "retired" in g.reason and "--update-baselines" in g.reason


def test_active_gpu_baselines_are_production_mode():
    for f in FILES:
        b = load_baseline_file(f)
        if b.retired or b.hardware_id.startswith("cpu-"):
            continue
        for pid, e in b.points.items():
            assert e.environment.engine_mode == "compiled", f"{f} {pid}: {e.environment.engine_mode}"


def test_the_thresholds_file_loads():
    t = load_thresholds(THRESHOLDS_PATH)
    assert t.gates and t.resolve("cpu-2c-amd-epyc").gates and t.resolve("h200-x1").gates
