"""The planner: from options, specs and a (fake) cluster to what runs, what is skipped and why.

``make_plan`` takes plain data (options, a ``SpecSet``, node lists), so nothing here starts Ray,
runs nvidia-smi or reads the environment. The repo's own topologies and workloads are loaded
where a test is about them; the rest build specs in memory.
"""

from __future__ import annotations

import re

import pytest

from pdperf.cluster import NodeInfo
from pdperf.session import plan as plan_module
from pdperf.session.options import SessionOptions, SpecSet, load_specs
from pdperf.session.plan import (
    CPU_TOPOLOGY_ON_GPU_RUN,
    GPU_TOPOLOGY_ON_CPU_RUN,
    VLLM_BACKEND_SINGLE_NODE,
    OutcomeGroup,
    SessionPlan,
    grouped_order,
    make_plan,
)
from pdperf.specs import Topology, Workload

pytestmark = pytest.mark.selftest

CPU_ONLY = [NodeInfo(node_id="local", ip="127.0.0.1", gpus=0, cpus=8.0, is_head=True)]
ONE_X8 = [NodeInfo(node_id="n1", ip="10.0.0.1", gpus=8, cpus=192.0, gpu_model="H100", is_head=True)]
TWO_X8 = ONE_X8 + [NodeInfo(node_id="n2", ip="10.0.0.2", gpus=8, cpus=192.0, gpu_model="H100")]
HEAD_PLUS_GPU = [NodeInfo(node_id="head", ip="10.0.0.9", cpus=8.0, is_head=True),
                 NodeInfo(node_id="w1", ip="10.0.0.1", gpus=8, cpus=192.0, gpu_model="H100")]

_REPO_SPECS: dict[tuple, SpecSet] = {}


def repo_plan(nodes: list[NodeInfo], **options) -> SessionPlan:
    """A plan over the repo's topologies/ and workloads/ (loaded once per set of options that shape them)."""
    opts = SessionOptions(**options)
    key = (opts.topology_patterns, opts.workload_patterns, str(opts.engine_overrides), opts.backend)
    if key not in _REPO_SPECS:
        _REPO_SPECS[key] = load_specs(opts)
    return make_plan(opts, _REPO_SPECS[key], nodes)


def specs(topologies: dict[str, dict], workloads: dict[str, dict]) -> SpecSet:
    return SpecSet(topologies={n: Topology.model_validate({"name": n, **d}) for n, d in topologies.items()},
                   workloads={n: Workload.model_validate({"name": n, **d}) for n, d in workloads.items()})


def fake_plan(spec_set: SpecSet, nodes: list[NodeInfo], **options) -> SessionPlan:
    return make_plan(SessionOptions(**options), spec_set, nodes)


CPU_COLLOC = {"kind": "collocated", "device": "cpu", "model": "tiny-llama", "collocated": {"tp": 1}}
CPU_PD = {"kind": "pd", "device": "cpu", "model": "tiny-llama", "prefill": {"tp": 1}, "decode": {"tp": 1}}
GPU_COLLOC = {"kind": "collocated", "model": "big", "collocated": {"tp": 2}}


@pytest.fixture
def sweep_specs() -> SpecSet:
    return specs({"cpu-a": CPU_COLLOC, "cpu-pd-x": CPU_PD, "gpu-g": GPU_COLLOC}, {
        "lat": {"device": "cpu", "isl": 8, "osl": 4, "topologies": ["cpu-pd-*"],
                "sweep": {"kind": "concurrency", "points": [1, 4], "requests_per_concurrency": 5, "min_requests": 3}},
        "rate": {"isl": 8, "osl": 4,
                 "sweep": {"kind": "rate", "points": [0.5, 2], "requests_per_point": 10}},
        "big": {"device": "gpu", "isl": 8, "osl": 4,
                "sweep": {"kind": "concurrency", "points": [8], "requests_per_point": 10}},
        "smoke": {"tier": "smoke", "isl": 8, "osl": 4,  # named by the smoke tests, never swept
                  "sweep": {"kind": "concurrency", "points": [2], "requests_per_point": 4}},
    })


def test_the_planner_does_no_io():
    """No Ray, no subprocess, no environment: a plan is a function of its inputs."""
    names = set(vars(plan_module))
    assert not names & {"os", "subprocess", "ray", "socket"}, names & {"os", "subprocess", "ray", "socket"}


# -- device and skips --------------------------------------------------------------------------

@pytest.mark.parametrize("nodes,device", [(ONE_X8, "gpu"), (HEAD_PLUS_GPU, "gpu"), (CPU_ONLY, "cpu"), ([], "cpu")])
def test_device_auto(nodes, device):
    assert repo_plan(nodes).device == device


def test_explicit_device_is_kept():
    assert repo_plan(ONE_X8, device="cpu").device == "cpu"


def test_cpu_topology_on_a_gpu_cluster_is_skipped():
    plan = repo_plan(ONE_X8)
    t = plan.specs.topologies["cpu-pd-1p1-1d1"]
    assert plan.skip_reason(t) == "topology cpu-pd-1p1-1d1: embedded-CPU topology; run it with --device cpu"
    assert plan.skip(t).reason == CPU_TOPOLOGY_ON_GPU_RUN
    assert plan.skip_reason(plan.specs.topologies["colloc-1xtp1"]) is None


def test_gpu_topology_on_a_cpu_cluster_is_skipped():
    plan = repo_plan(CPU_ONLY)
    assert plan.skip_reason(plan.specs.topologies["colloc-1xtp1"]) == f"topology colloc-1xtp1: {GPU_TOPOLOGY_ON_CPU_RUN}"
    assert plan.skip_reason(plan.specs.topologies["cpu-pd-1p1-1d1"]) is None


def test_gpu_topology_with_device_cpu_on_a_gpu_cluster_is_skipped():
    plan = repo_plan(ONE_X8, device="cpu")
    assert "this run is --device cpu" in plan.skip_reason(plan.specs.topologies["colloc-1xtp1"])


def test_gpu_topologies_of_a_cpu_run_share_one_reason_without_their_names():
    """A newcomer's first run: one reason for every GPU topology, so pytest's -ra folds their skipped
    tests into a line per test function (it folds only identical reasons), and the collection table
    lists them on one line."""
    plan = repo_plan(CPU_ONLY)
    gpu = [t for t in plan.topologies() if t.device == "gpu"]
    assert len(gpu) > 10
    assert {plan.skip(t).reason for t in gpu} == {GPU_TOPOLOGY_ON_CPU_RUN}
    groups = plan.outcome_groups(plan.topologies())
    assert groups == [OutcomeGroup(None, ("cpu-colloc-1xtp1", "cpu-pd-1p1-1d1", "cpu-pd-1p1-1d1-push")),
                      OutcomeGroup(GPU_TOPOLOGY_ON_CPU_RUN, tuple(sorted(t.name for t in gpu)))]


def test_outcome_groups_one_per_reason_in_name_order():
    plan = repo_plan(ONE_X8)
    used = [plan.specs.topologies[n] for n in ("pd-1p4-1d4-spread-tcp", "cpu-pd-1p1-1d1", "colloc-1xtp1",
                                               "pd-1p4-1d4-spread-efa", "cpu-colloc-1xtp1", "colloc-1xtp1")]
    groups = plan.outcome_groups(used)
    assert [g.names for g in groups] == [("colloc-1xtp1",), ("cpu-colloc-1xtp1", "cpu-pd-1p1-1d1"),
                                         ("pd-1p4-1d4-spread-efa",), ("pd-1p4-1d4-spread-tcp",)]
    assert groups[0].reason is None and groups[1].reason == CPU_TOPOLOGY_ON_GPU_RUN
    assert groups[3].reason == "placement 'spread' needs 2 GPU nodes, found 1"  # the placement's, without the name


def test_skip_reason_carries_the_placement_reason():
    plan = repo_plan(ONE_X8)
    assert "needs 2 GPU nodes, found 1" in plan.skip_reason(plan.specs.topologies["pd-1p4-1d4-spread-tcp"])
    plan = repo_plan(TWO_X8)
    assert plan.skip_reason(plan.specs.topologies["pd-1p4-1d4-spread-tcp"]) is None
    assert "nodes without EFA: 10.0.0.1, 10.0.0.2" in plan.skip_reason(plan.specs.topologies["pd-1p4-1d4-spread-efa"])
    skip = plan.skip(plan.specs.topologies["pd-1p4-1d4-spread-efa"])
    assert skip.message == f"topology pd-1p4-1d4-spread-efa: {skip.reason}" and "spread-efa" not in skip.reason


def test_vllm_backend_cannot_spread():
    plan = repo_plan(TWO_X8, backend="vllm")
    assert plan.skip(plan.specs.topologies["pd-1p4-1d4-spread-tcp"]).reason == VLLM_BACKEND_SINGLE_NODE
    assert "--backend ray" in plan.skip_reason(plan.specs.topologies["pd-1p4-1d4-spread-tcp"])
    assert plan.skip_reason(plan.specs.topologies["pd-1p4-1d4-pack"]) is None


# -- --topology / --workload -------------------------------------------------------------------

def test_topology_patterns():
    plan = repo_plan(CPU_ONLY, topology_patterns=("cpu-*",))
    assert [t.name for t in plan.topologies()] == ["cpu-colloc-1xtp1", "cpu-pd-1p1-1d1", "cpu-pd-1p1-1d1-push"]
    assert [t.name for t in plan.topologies(kind="pd")] == ["cpu-pd-1p1-1d1", "cpu-pd-1p1-1d1-push"]
    plan = repo_plan(ONE_X8, topology_patterns=("colloc-1xtp1", "pd-1p1-*"))
    assert [t.name for t in plan.topologies()] == ["colloc-1xtp1", "pd-1p1-1d1-1gpu", "pd-1p1-1d1-1gpu-push",
                                                  "pd-1p1-1d1-pack"]
    everything = repo_plan(ONE_X8)
    network_only = [n for n, t in everything.specs.topologies.items() if "network-only" in t.tags]
    assert len(everything.topologies()) == len(everything.specs.topologies) - len(network_only)  # no pattern: all


def test_workloads_follow_device_and_patterns(sweep_specs):
    assert [w.name for w in fake_plan(sweep_specs, CPU_ONLY).workloads()] == ["lat", "rate", "smoke"]
    assert [w.name for w in fake_plan(sweep_specs, CPU_ONLY, workload_patterns=("ra*",)).workloads()] == ["rate"]
    assert [w.name for w in fake_plan(sweep_specs, ONE_X8).workloads()] == ["big", "rate", "smoke"]


# -- sweep cases -------------------------------------------------------------------------------

def test_sweep_cases_ids_counts_and_topology_patterns(sweep_specs):
    plan = fake_plan(sweep_specs, CPU_ONLY)
    cases = plan.sweep_cases()
    # Topology first (consecutive cases share a deployment); 'lat' sweeps cpu-pd-* only, with 5
    # requests per unit of concurrency (at least 3); the smoke-tier workload is not swept.
    assert [(c.id, c.requests) for c in cases] == [
        ("cpu-a/rate/r0.5", 10),
        ("cpu-a/rate/r2", 10),
        ("cpu-pd-x/lat/c1", 5),
        ("cpu-pd-x/lat/c4", 20),
        ("cpu-pd-x/rate/r0.5", 10),
        ("cpu-pd-x/rate/r2", 10),
    ]
    assert [c.id for c in plan.sweep_cases("concurrency")] == ["cpu-pd-x/lat/c1", "cpu-pd-x/lat/c4"]
    assert all(c.workload.sweep.kind == "rate" for c in plan.sweep_cases("rate"))


@pytest.mark.parametrize("scale,expected", [(0.2, [2, 2, 1, 4, 2, 2]), (0.01, [1, 1, 1, 1, 1, 1]),
                                            (2.0, [20, 20, 10, 40, 20, 20])])
def test_requests_scale(sweep_specs, scale, expected):
    assert [c.requests for c in fake_plan(sweep_specs, CPU_ONLY, requests_scale=scale).sweep_cases()] == expected


def test_gpu_sweep_cases_leave_cpu_topologies_out(sweep_specs):
    assert [c.id for c in fake_plan(sweep_specs, ONE_X8).sweep_cases()] == ["gpu-g/big/c8", "gpu-g/rate/r0.5",
                                                                            "gpu-g/rate/r2"]


@pytest.mark.parametrize("nodes", [CPU_ONLY, TWO_X8], ids=["cpu", "gpu"])
def test_repo_sweep_ids_are_unique_and_carry_coordinates(nodes):
    ids = [c.id for c in repo_plan(nodes).sweep_cases()]
    assert ids, "the repo's workloads give no sweep case on this cluster"
    assert len(ids) == len(set(ids))
    for case_id in ids:
        assert re.fullmatch(r"[a-z0-9.\-]+/[a-z0-9.\-]+/(c\d+|r[0-9.e+\-]+)", case_id), case_id


def test_repo_cpu_sweep_gates_collocated_only_and_not_the_smoke_workload():
    # PD on 2 CPU cores runs ~6 min a point: CI's gated CPU sweeps cover the collocated topology;
    # PD is covered on CPU by the smoke tier (benchmarks/results/gpu-runs/SESSION-LOG.md).
    cases = repo_plan(CPU_ONLY).sweep_cases()
    assert cases and all(c.id.startswith("cpu-colloc-1xtp1/") for c in cases)
    assert not [c.id for c in cases if c.workload.tier != "sweep"]


# -- reference topology and deployment groups --------------------------------------------------

def test_reference_for_repo_cpu_pd():
    plan = repo_plan(CPU_ONLY)
    ref = plan.reference_for(plan.specs.topologies["cpu-pd-1p1-1d1"])
    assert ref is not None and ref.name == "cpu-colloc-1xtp1"
    assert plan.reference_for(plan.specs.topologies["cpu-colloc-1xtp1"]) is None


def test_reference_for_matches_model_and_decode_tp():
    pd = {"kind": "pd", "model": "m", "prefill": {"tp": 1}, "decode": {"tp": 2}}
    plan = fake_plan(specs({
        "pd-x": pd,
        "pd-orphan": {**pd, "model": "other-model", "decode": {"tp": 4}},
        "c-2xtp2": {"kind": "collocated", "model": "m", "collocated": {"replicas": 2, "tp": 2}},
        "c-1xtp2": {"kind": "collocated", "model": "m", "collocated": {"replicas": 1, "tp": 2}},
        "c-1xtp1": {"kind": "collocated", "model": "m", "collocated": {"replicas": 1, "tp": 1}},
        "c-other": {"kind": "collocated", "model": "other-model", "collocated": {"replicas": 1, "tp": 2}},
    }, {}), ONE_X8)
    assert plan.reference_for(plan.specs.topologies["pd-x"]).name == "c-1xtp2"  # same model and TP, fewest GPUs
    assert plan.reference_for(plan.specs.topologies["pd-orphan"]) is None


def test_reference_for_the_single_gpu_pd_and_under_model_override():
    plan = repo_plan(ONE_X8)
    assert plan.reference_for(plan.specs.topologies["pd-1p1-1d1-1gpu"]).name == "colloc-1xtp1-8b"
    # --model serves one model on every GPU topology: the 120B files' references then qualify too
    plan = repo_plan(ONE_X8, model_override="llama-3.1-8b", topology_patterns=("pd-1p1-1d1-1gpu", "colloc-1xtp1"))
    assert plan.served_model(plan.specs.topologies["colloc-1xtp1"]) == "llama-3.1-8b"
    assert plan.reference_for(plan.specs.topologies["pd-1p1-1d1-1gpu"]).name == "colloc-1xtp1"


def test_network_only_topologies_only_for_the_network_tag():
    plan = repo_plan(CPU_ONLY, topology_patterns=("cpu-*",))
    assert "cpu-pd-1p1-1d1-tcp" not in [t.name for t in plan.topologies()]
    assert "cpu-pd-1p1-1d1-tcp" not in [c.topology.name for c in plan.sweep_cases()]
    assert [t.name for t in plan.topologies(kind="pd", tag="network")] == ["cpu-pd-1p1-1d1", "cpu-pd-1p1-1d1-push",
                                                                        "cpu-pd-1p1-1d1-tcp"]


def test_pd_shares_a_deployment_group_with_its_reference():
    plan = repo_plan(ONE_X8, topology_patterns=("pd-1p1-1d1-pack", "colloc-2xtp1"))
    pd, ref = plan.specs.topologies["pd-1p1-1d1-pack"], plan.specs.topologies["colloc-2xtp1"]
    assert plan.reference_for(pd).name == "colloc-2xtp1"
    assert plan.deployment_group(pd) == plan.deployment_group(ref) == "colloc-2xtp1"
    assert plan.deployment_group(plan.specs.topologies["colloc-1xtp2"]) == "colloc-1xtp2"


def test_prestart_set_only_when_everything_fits_at_once():
    plan = repo_plan(ONE_X8)
    t = plan.specs.topologies
    pd, ref, big = t["pd-1p1-1d1-pack"], t["colloc-2xtp1"], t["colloc-1xtp8"]
    assert [x.name for x in plan.prestart_set([pd, ref, pd])] == ["pd-1p1-1d1-pack", "colloc-2xtp1"]
    assert plan.prestart_set([pd]) == []  # one topology: nothing to overlap
    assert plan.prestart_set([pd, big]) == []  # 2 + 8 GPUs on an 8-GPU cluster
    assert repo_plan(ONE_X8, max_alive=1).prestart_set([pd, ref]) == []
    assert repo_plan(ONE_X8, prestart=False).prestart_set([pd, ref]) == []


def test_grouped_order_runs_each_deployment_groups_tests_together():
    # pytest's own order: smoke by function then topology, then the sweeps (seen on 4x H100: the pool
    # would have redeployed colloc-2xtp1 after the PD group's reference had evicted it)
    c2, ref, pd = ("colloc-2xtp1", "colloc-2xtp1"), ("colloc-1xtp1", "colloc-1xtp1"), ("colloc-1xtp1", "pd-1p1-1d1")
    keys = [c2, pd, None, ref, c2, pd, ref, c2]
    assert grouped_order(keys) == [0, 4, 7, 1, 5, 3, 6, 2]  # c2's tests; then the PD group: PD's, its reference's
    assert grouped_order([None, None]) == [0, 1] and grouped_order([]) == []
    # a test that may evict its own topology runs after that topology's other tests, still in its group
    assert grouped_order(keys, frozenset({4})) == [0, 7, 4, 1, 5, 3, 6, 2]


# -- external backend --------------------------------------------------------------------------

def test_external_backend_serves_one_stand_in_topology():
    plan = repo_plan(CPU_ONLY, backend="external", external_url="http://127.0.0.1:1")
    topologies = plan.topologies()
    assert [t.name for t in topologies] == ["external"]
    assert plan.skip_reason(topologies[0]) is None


def test_external_backend_takes_the_shape_of_a_named_topology():
    plan = repo_plan(CPU_ONLY, backend="external", external_url="http://127.0.0.1:1",
                     topology_patterns=("colloc-1xtp1",))
    assert [t.name for t in plan.topologies()] == ["colloc-1xtp1"]
    assert plan.skip(plan.topologies()[0]) is None  # someone else's server: nothing to place


def test_cluster_description():
    assert repo_plan(CPU_ONLY).cluster_description() == "1 node(s), no GPU"
    assert repo_plan(HEAD_PLUS_GPU).cluster_description() == "10.0.0.1: 8x H100"
