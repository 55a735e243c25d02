"""Deployments up beside the measured one: recorded with each point (``co_resident``), noted by the
baseline gate, shown in the report. On 4x H100 a collocated topology's TPOT p50 went from 14.5 ms
alone to 26 ms with an idle PD app up beside it, so a point must say what shared the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdperf.backends.base import Deployment, Endpoint
from pdperf.environment import co_resident, point_environment
from pdperf.gate import compare_point, gate_point, load_thresholds, write_baseline
from pdperf.gate.store import new_entry
from pdperf.lifecycle import DeploymentPool
from pdperf.report import build_report
from pdperf.report.html import point_fragment
from pdperf.report.synthetic import synthetic_point
from pdperf.results import save_point
from pdperf.specs import Topology

pytestmark = pytest.mark.selftest

CPU = "cpu-2c-test"


def topology(name: str, kind: str = "collocated") -> Topology:
    if kind == "pd":
        return Topology(name=name, kind="pd", device="cpu", model="tiny-llama",
                        prefill={"replicas": 1, "tp": 1}, decode={"replicas": 1, "tp": 1})
    return Topology(name=name, kind="collocated", device="cpu", model="tiny-llama", collocated={"tp": 1})


class Up(Deployment):
    backend = "fake"

    def __init__(self, topo: Topology):
        self.topology = topo

    def launch(self) -> None:
        pass

    def wait_ready(self, timeout_s: float) -> Endpoint:
        return Endpoint(topology=self.topology, backend=self.backend, base_url="http://fake", model_id="m",
                        tokenizer_path=Path("/nonexistent"), startup_s=1.25, details={"app": self.topology.name})

    def stop(self, *, evict: bool = False) -> None:
        pass


FINGERPRINT = {"hardware_id": CPU, "vllm_version": "0.32.0"}


def test_point_environment_names_the_other_deployments_up_sorted():
    pool = DeploymentPool(Up, max_alive=3)
    colloc = pool.get(topology("colloc-2xtp1"))
    assert "co_resident" not in point_environment(FINGERPRINT, colloc, pool=pool)  # alone: no key
    pool.get(topology("pd-ray-1p1d", "pd"))
    pool.get(topology("colloc-1x"))
    env = point_environment(FINGERPRINT, colloc, pool=pool, engine_overrides={"max_num_seqs": 8})
    assert env["co_resident"] == "colloc-1x,pd-ray-1p1d"
    assert env["hardware_id"] == CPU and env["deploy_app"] == "colloc-2xtp1" and env["startup_s"] == 1.2
    assert env["engine_overrides"] == '{"max_num_seqs": 8}'
    pool.close()
    assert "co_resident" not in point_environment(FINGERPRINT, colloc, pool=pool)


def test_no_pool_means_no_co_resident_key():  # e.g. an endpoint made without the session's pool
    endpoint = Up(topology("external")).wait_ready(1)
    assert co_resident(None, "external") == ""
    assert "co_resident" not in point_environment(FINGERPRINT, endpoint, pool=None)


def test_applications_another_run_kept_up_count_too():
    """--keep-deployments leaves Serve apps up across pytest runs; this run's pool does not know them,
    the backend does (ray: serve.status()). Both are recorded, each name once."""
    endpoint = Up(topology("colloc-2xtp1")).wait_ready(1)
    endpoint.neighbours = lambda: ["pd-kept-earlier", "colloc-1x"]
    pool = DeploymentPool(lambda t: Up(t), max_alive=3)
    pool.get(topology("colloc-1x"))
    env = point_environment(FINGERPRINT, endpoint, pool=pool)
    assert env["co_resident"] == "colloc-1x,pd-kept-earlier"
    assert co_resident(None, "colloc-2xtp1", ["colloc-2xtp1", "x"]) == "x"  # never itself
    assert Endpoint(topology=topology("a"), backend="b", base_url="u", model_id="m",
                    tokenizer_path=Path(".")).neighbours() == []  # backends that see none


def _point(seed: int, **env):
    return synthetic_point("colloc-2xtp1", "isl128-osl8", 4, n=150, output_tokens=8, seed=seed,
                           environment={**FINGERPRINT, **env})


def _entry(p):
    return new_entry(p)


def test_gate_notes_a_point_measured_beside_others_against_one_measured_alone(tmp_path):
    thresholds = load_thresholds()
    alone, beside = _point(1), _point(2, co_resident="pd-ray-1p1d")
    write_baseline(tmp_path, [alone])
    g = gate_point(tmp_path, beside, thresholds)
    assert "environment differs: co_resident (none) -> pd-ray-1p1d" in g.notes
    back = compare_point(alone, _entry(beside), beside.environment, thresholds)
    assert "environment differs: co_resident pd-ray-1p1d -> (none)" in back.notes
    # alone against alone, whether the key is absent (baselines from before it) or empty: no note
    for env in ({}, {"co_resident": ""}):
        g = compare_point(_point(3, **env), _entry(alone), alone.environment, thresholds)
        assert not [n for n in g.notes if "co_resident" in n], g.notes


def test_report_says_what_a_topology_was_measured_beside(tmp_path):
    run_dir = tmp_path / "run-beside"
    for i, env in enumerate(({"co_resident": "colloc-1x,pd-ray-1p1d"}, {})):
        p = synthetic_point("colloc-2xtp1", "w", 4 * (i + 1), n=12, output_tokens=3, seed=i,
                            environment={"hardware_id": CPU, **env})
        save_point(run_dir / "points" / f"p{i}.json", p)
        if env:
            assert "measured beside colloc-1x,pd-ray-1p1d" in point_fragment(p)  # pytest-html's per-test extra
    lone = synthetic_point("pd-1p1d", "w", 4, n=12, output_tokens=3, seed=5, environment={"hardware_id": CPU})
    save_point(run_dir / "points" / "lone.json", lone)
    assert "measured beside" not in point_fragment(lone)
    html = build_report(run_dir).read_text()
    assert "collocated, 2 GPUs, measured beside colloc-1x, pd-ray-1p1d (some points alone)</span>" in html
    assert html.count("measured beside") == 1  # the lone PD topology says nothing


def test_point_environment_records_the_model_served_not_the_name_requests_carry():
    # On 4x H100 (session 8) points recorded the Serve application's name ("colloc-2xtp1") as the
    # model: two runs of one topology with different --model would have joined one band.
    endpoint = Endpoint(topology=topology("colloc-2xtp1"), backend="ray", base_url="u", model_id="colloc-2xtp1",
                        tokenizer_path=Path("/nonexistent"), model="llama-3.1-8b")
    assert point_environment(FINGERPRINT, endpoint)["model"] == "llama-3.1-8b"
    unknown = Endpoint(topology=topology("x"), backend="b", base_url="u", model_id="x", tokenizer_path=Path("/n"))
    assert "model" not in point_environment(FINGERPRINT, unknown)  # unknown: no key, accepted by any band

