"""The collection-time note on sweep points with too few requests for a per-request gate.

TTFT, TPOT and E2E give one sample per request, so a point of 16 requests can never meet
a gate's min_samples of 30 (or 100 for p99s): those gates read 'insufficient' and the
point passes on its ITL gates alone. ``baselines.sample_shortfalls`` says so at collection,
on the real workload files and the real thresholds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdperf import metrics
from pdperf.gate.thresholds import THRESHOLDS_PATH, Thresholds, load_thresholds, sample_shortfalls
from pdperf.report.synthetic import synthetic_point
from pdperf.specs import WORKLOAD_DIR, load_workload

pytestmark = pytest.mark.selftest

ROOT = Path(__file__).resolve().parents[2]
GPU_SMALL = "gpu-small-isl1024-osl256"
GPU_SMALL_LINE = (f"{GPU_SMALL}: p99 ttft_ms/tpot_ms need 100 requests a point (c1 has 16, c4 32); "
                  "p50 ttft_ms/tpot_ms and mean e2e_ms need 30 (c1 has 16): they read 'insufficient' there "
                  "(raise requests_per_concurrency / min_requests to gate them)")


@pytest.fixture(scope="module")
def thresholds() -> Thresholds:
    return load_thresholds()


def workload(name: str):
    return load_workload(WORKLOAD_DIR / f"{name}.yaml")


def test_per_request_metrics_give_one_sample_per_request():
    p = synthetic_point("colloc", n=40, output_tokens=16)
    measured = [r for r in p.records if r.ok and not r.warmup]
    assert set(metrics.PER_REQUEST_METRICS) == {"ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"}
    for m in metrics.PER_REQUEST_METRICS:
        assert len(metrics.samples(p.records, m)) == len(measured)
    for m in set(metrics.LATENCY_METRICS) - set(metrics.PER_REQUEST_METRICS):  # itl_ms, chunk_gap_ms: per gap
        assert len(metrics.samples(p.records, m)) > 10 * len(measured)


@pytest.mark.parametrize("hardware_id", [None, "h100-x4", "cpu-2c-amd-epyc"])
def test_gpu_small_workload_names_its_short_points(thresholds, hardware_id):
    # 8 x concurrency, at least 16: c1 16, c4 32, c16 128, c64 512 requests
    assert sample_shortfalls(workload(GPU_SMALL), thresholds, hardware_id=hardware_id) == [GPU_SMALL_LINE]


def test_selected_points_only_and_requests_scale(thresholds):
    w = workload(GPU_SMALL)
    assert sample_shortfalls(w, thresholds, points=[16, 64]) == []
    [line] = sample_shortfalls(w, thresholds, points=[4, 16])
    assert "(c4 has 32)" in line and "need 30" not in line
    [line] = sample_shortfalls(w, thresholds, requests_scale=0.2)  # c1 3, c4 6, c16 26, c64 102
    assert "(c1 has 3, c4 6, c16 26)" in line and "c64" not in line
    assert line.endswith("(raise requests_per_concurrency / min_requests to gate them, or drop --requests-scale 0.2)")
    assert sample_shortfalls(w, thresholds, requests_scale=7) == []  # c1: 112


def test_workloads_with_enough_requests_give_no_lines(thresholds):
    assert sample_shortfalls(workload("gpu-isl5000-osl250"), thresholds) == []  # at least 200 a point
    w = workload(GPU_SMALL)
    enough = w.model_copy(update={"sweep": w.sweep.model_copy(update={"min_requests": 100})})
    assert sample_shortfalls(enough, thresholds) == []


def test_cpu_workloads_fixed_count_points(thresholds):
    # CI's workloads: 60 and 30 requests a point meet the p50 gates' 30 but not the p99 gates' 100
    assert sample_shortfalls(workload("cpu-latency"), thresholds, hardware_id="cpu-2c-amd-epyc") == [
        "cpu-latency: p99 ttft_ms/tpot_ms need 100 requests a point (c1, c2 have 60): they read 'insufficient' "
        "there (raise requests_per_point to gate them)"]
    assert sample_shortfalls(workload("cpu-rate"), thresholds, hardware_id="cpu-2c-amd-epyc") == [
        "cpu-rate: p99 ttft_ms/tpot_ms need 100 requests a point (r1, r2 have 30): they read 'insufficient' "
        "there (raise requests_per_point to gate them)"]


def test_hardware_override_of_min_samples_and_disabled_gates():
    data = yaml.safe_load(THRESHOLDS_PATH.read_text())
    data["hardware"] = [{"match": "cpu-*", "min_samples": 10, "gates": [
        {"metric": "ttft_ms", "statistic": "p99", "min_samples": 20},
        {"metric": "tpot_ms", "statistic": "p99", "enabled": False}]}]
    t = Thresholds.model_validate(data)
    w = workload(GPU_SMALL)
    assert sample_shortfalls(w, t, hardware_id="cpu-2c-x") == [
        f"{GPU_SMALL}: p99 ttft_ms need 20 requests a point (c1 has 16): they read 'insufficient' there "
        "(raise requests_per_concurrency / min_requests to gate them)"]
    assert sample_shortfalls(w, t, hardware_id="h100-x4") == [GPU_SMALL_LINE]  # the override does not match
    assert sample_shortfalls(w, t.resolve("cpu-2c-x")) == sample_shortfalls(w, t, hardware_id="cpu-2c-x")


def test_collection_prints_the_note_under_the_table(tmp_path):
    """`pytest --collect-only` of the CPU sweeps (no Ray is started at collection)."""
    def collect(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests/sweeps", "--device", "cpu", "--workload", "cpu-latency", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    text = collect()
    assert "pdperf: too few requests for some per-request gates on cpu-" in text
    assert "  cpu-latency: p99 ttft_ms/tpot_ms need 100 requests a point (c1, c2 have 60)" in text
    assert text.index("pdperf: backend") < text.index("too few requests")
    assert "too few requests" not in collect("--requests-scale", "2")  # 120 a point
