"""Selection: from options and a (fake) cluster to the topologies that run, the skips and the sweep ids.

``SessionContext.from_options`` is given explicit ``nodes=`` lists, so nothing here starts Ray
or runs nvidia-smi. The options namespace is built from ``fixtures/options.py`` itself (its
defaults), so a new option shows up here without editing this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fixtures import options as options_plugin
from pdperf.cluster import NodeInfo
from pdperf.errors import SpecError
from pdperf.selection import SessionContext
from pdperf.specs import ROOT

pytestmark = pytest.mark.selftest


class _OptionRecorder:
    """Stands in for pytest's parser: records each option's dest and default."""

    def __init__(self) -> None:
        self.defaults: dict[str, object] = {}

    def getgroup(self, *args, **kwargs) -> "_OptionRecorder":
        return self

    def addoption(self, *names: str, **kw) -> None:
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        self.defaults[dest] = kw.get("default", False if kw.get("action") == "store_true" else None)


_recorder = _OptionRecorder()
options_plugin.pytest_addoption(_recorder)  # type: ignore[arg-type]


def options(**overrides) -> SimpleNamespace:
    unknown = set(overrides) - set(_recorder.defaults)
    assert not unknown, f"fixtures/options.py defines no option for {unknown}"
    return SimpleNamespace(**{**_recorder.defaults, **overrides})


CPU_ONLY = [NodeInfo(node_id="local", ip="127.0.0.1", gpus=0, cpus=8.0, is_head=True)]
ONE_X8 = [NodeInfo(node_id="n1", ip="10.0.0.1", gpus=8, cpus=192.0, gpu_model="H100", is_head=True)]
TWO_X8 = ONE_X8 + [NodeInfo(node_id="n2", ip="10.0.0.2", gpus=8, cpus=192.0, gpu_model="H100")]
HEAD_PLUS_GPU = [NodeInfo(node_id="head", ip="10.0.0.9", cpus=8.0, is_head=True),
                 NodeInfo(node_id="w1", ip="10.0.0.1", gpus=8, cpus=192.0, gpu_model="H100")]


def repo_ctx(nodes: list[NodeInfo], **opts) -> SessionContext:
    return SessionContext.from_options(options(**opts), ROOT, nodes=nodes)


def make_root(tmp_path: Path, topologies: dict[str, dict], workloads: dict[str, dict]) -> Path:
    for folder, specs in (("topologies", topologies), ("workloads", workloads)):
        (tmp_path / folder).mkdir()
        for name, data in specs.items():
            (tmp_path / folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


CPU_COLLOC = {"kind": "collocated", "device": "cpu", "model": "tiny-llama", "collocated": {"tp": 1}}
CPU_PD = {"kind": "pd", "device": "cpu", "model": "tiny-llama", "prefill": {"tp": 1}, "decode": {"tp": 1}}
GPU_COLLOC = {"kind": "collocated", "model": "big", "collocated": {"tp": 2}}


@pytest.fixture
def sweep_root(tmp_path) -> Path:
    return make_root(tmp_path, {"cpu-a": CPU_COLLOC, "cpu-pd-x": CPU_PD, "gpu-g": GPU_COLLOC}, {
        "lat": {"device": "cpu", "isl": 8, "osl": 4, "topologies": ["cpu-pd-*"],
                "sweep": {"kind": "concurrency", "points": [1, 4], "requests_per_concurrency": 5, "min_requests": 3}},
        "rate": {"isl": 8, "osl": 4,
                 "sweep": {"kind": "rate", "points": [0.5, 2], "requests_per_point": 10}},
        "big": {"device": "gpu", "isl": 8, "osl": 4,
                "sweep": {"kind": "concurrency", "points": [8], "requests_per_point": 10}},
        "smoke": {"tier": "smoke", "isl": 8, "osl": 4,  # named by the smoke tests, never swept
                  "sweep": {"kind": "concurrency", "points": [2], "requests_per_point": 4}},
    })


# -- device and skips --------------------------------------------------------------------------

@pytest.mark.parametrize("nodes,device", [(ONE_X8, "gpu"), (HEAD_PLUS_GPU, "gpu"), (CPU_ONLY, "cpu"), ([], "cpu")])
def test_device_auto(nodes, device):
    assert repo_ctx(nodes).device == device


def test_explicit_device_is_kept():
    assert repo_ctx(ONE_X8, device="cpu").device == "cpu"


def test_cpu_topology_on_a_gpu_cluster_is_skipped():
    ctx = repo_ctx(ONE_X8)
    reason = ctx.skip_reason(ctx.all_topologies["cpu-pd-1p1-1d1"])
    assert reason == "topology cpu-pd-1p1-1d1: embedded-CPU topology; run it with --device cpu"
    assert ctx.skip_reason(ctx.all_topologies["colloc-1xtp1"]) is None


def test_gpu_topology_on_a_cpu_cluster_is_skipped():
    ctx = repo_ctx(CPU_ONLY)
    reason = ctx.skip_reason(ctx.all_topologies["colloc-1xtp1"])
    assert reason is not None and "colloc-1xtp1" in reason and "no GPU node" in reason
    assert ctx.skip_reason(ctx.all_topologies["cpu-pd-1p1-1d1"]) is None


def test_gpu_topology_with_device_cpu_on_a_gpu_cluster_is_skipped():
    ctx = repo_ctx(ONE_X8, device="cpu")
    assert "this run is --device cpu" in ctx.skip_reason(ctx.all_topologies["colloc-1xtp1"])


def test_skip_reason_carries_the_placement_reason():
    ctx = repo_ctx(ONE_X8)
    assert "needs 2 GPU nodes, found 1" in ctx.skip_reason(ctx.all_topologies["pd-1p4-1d4-spread-tcp"])
    ctx = repo_ctx(TWO_X8)
    assert ctx.skip_reason(ctx.all_topologies["pd-1p4-1d4-spread-tcp"]) is None
    assert "nodes without EFA: 10.0.0.1, 10.0.0.2" in ctx.skip_reason(ctx.all_topologies["pd-1p4-1d4-spread-efa"])


def test_vllm_backend_cannot_spread():
    ctx = repo_ctx(TWO_X8, backend="vllm")
    assert "--backend ray" in ctx.skip_reason(ctx.all_topologies["pd-1p4-1d4-spread-tcp"])
    assert ctx.skip_reason(ctx.all_topologies["pd-1p4-1d4-pack"]) is None


# -- --topology / --workload -------------------------------------------------------------------

def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(SpecError) as e:
        repo_ctx(CPU_ONLY, topology=["cpu-*", "no-such-topology"])
    msg = str(e.value)
    assert msg.startswith("--topology no-such-topology: no such topology")
    assert "cpu-*" not in msg.split(":")[0]  # only the pattern that matched nothing is named
    assert "cpu-pd-1p1-1d1" in msg and "colloc-1xtp1" in msg


def test_unknown_workload_lists_the_known_ones():
    with pytest.raises(SpecError) as e:
        repo_ctx(CPU_ONLY, workload=["no-such-workload"])
    assert "--workload no-such-workload" in str(e.value) and "smoke-cpu" in str(e.value)


def test_topology_patterns():
    ctx = repo_ctx(CPU_ONLY, topology=["cpu-*"])
    assert [t.name for t in ctx.topologies()] == ["cpu-colloc-1xtp1", "cpu-pd-1p1-1d1"]
    assert [t.name for t in ctx.topologies(kind="pd")] == ["cpu-pd-1p1-1d1"]
    ctx = repo_ctx(ONE_X8, topology=["colloc-1xtp1", "pd-1p1-*"])
    assert [t.name for t in ctx.topologies()] == ["colloc-1xtp1", "pd-1p1-1d1-pack"]
    assert len(repo_ctx(ONE_X8).topologies()) == len(ctx.all_topologies)  # no pattern: all


def test_workloads_follow_device_and_patterns(sweep_root):
    ctx = SessionContext.from_options(options(), sweep_root, nodes=CPU_ONLY)
    assert [w.name for w in ctx.workloads()] == ["lat", "rate", "smoke"]
    ctx = SessionContext.from_options(options(workload=["ra*"]), sweep_root, nodes=CPU_ONLY)
    assert [w.name for w in ctx.workloads()] == ["rate"]
    ctx = SessionContext.from_options(options(), sweep_root, nodes=ONE_X8)
    assert [w.name for w in ctx.workloads()] == ["big", "rate", "smoke"]


# -- sweep cases -------------------------------------------------------------------------------

def test_sweep_cases_ids_counts_and_topology_patterns(sweep_root):
    ctx = SessionContext.from_options(options(), sweep_root, nodes=CPU_ONLY)
    cases = ctx.sweep_cases()
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
    assert [c.id for c in ctx.sweep_cases("concurrency")] == ["cpu-pd-x/lat/c1", "cpu-pd-x/lat/c4"]
    assert all(c.workload.sweep.kind == "rate" for c in ctx.sweep_cases("rate"))


@pytest.mark.parametrize("scale,expected", [(0.2, [2, 2, 1, 4, 2, 2]), (0.01, [1, 1, 1, 1, 1, 1]),
                                            (2.0, [20, 20, 10, 40, 20, 20])])
def test_requests_scale(sweep_root, scale, expected):
    ctx = SessionContext.from_options(options(requests_scale=scale), sweep_root, nodes=CPU_ONLY)
    assert [c.requests for c in ctx.sweep_cases()] == expected


def test_requests_scale_must_be_positive():
    with pytest.raises(SpecError, match="--requests-scale 0"):
        repo_ctx(CPU_ONLY, requests_scale=0.0)


def test_gpu_sweep_cases_leave_cpu_topologies_out(sweep_root):
    ctx = SessionContext.from_options(options(), sweep_root, nodes=ONE_X8)
    assert [c.id for c in ctx.sweep_cases()] == ["gpu-g/big/c8", "gpu-g/rate/r0.5", "gpu-g/rate/r2"]


@pytest.mark.parametrize("nodes", [CPU_ONLY, TWO_X8], ids=["cpu", "gpu"])
def test_repo_sweep_ids_are_unique_and_carry_coordinates(nodes):
    ctx = repo_ctx(nodes)
    ids = [c.id for c in ctx.sweep_cases()]
    assert ids, "the repo's workloads give no sweep case on this cluster"
    assert len(ids) == len(set(ids))
    for case_id in ids:
        assert re.fullmatch(r"[a-z0-9.\-]+/[a-z0-9.\-]+/(c\d+|r[0-9.e+\-]+)", case_id), case_id


def test_repo_cpu_sweep_gates_collocated_only_and_not_the_smoke_workload():
    # PD on 2 CPU cores runs ~6 min a point: CI's gated CPU sweeps cover the collocated topology;
    # PD is covered on CPU by the smoke tier (benchmarks/results/gpu-runs/SESSION-LOG.md).
    ctx = repo_ctx(CPU_ONLY)
    cases = ctx.sweep_cases()
    assert cases and all(c.id.startswith("cpu-colloc-1xtp1/") for c in cases)
    assert not [c.id for c in cases if c.workload.tier != "sweep"]


# -- reference topology ------------------------------------------------------------------------

def test_reference_for_repo_cpu_pd():
    ctx = repo_ctx(CPU_ONLY)
    ref = ctx.reference_for(ctx.all_topologies["cpu-pd-1p1-1d1"])
    assert ref is not None and ref.name == "cpu-colloc-1xtp1"
    assert ctx.reference_for(ctx.all_topologies["cpu-colloc-1xtp1"]) is None


def test_reference_for_matches_model_and_decode_tp(tmp_path):
    pd = {"kind": "pd", "model": "m", "prefill": {"tp": 1}, "decode": {"tp": 2}}
    root = make_root(tmp_path, {
        "pd-x": pd,
        "pd-orphan": {**pd, "model": "other-model", "decode": {"tp": 4}},
        "c-2xtp2": {"kind": "collocated", "model": "m", "collocated": {"replicas": 2, "tp": 2}},
        "c-1xtp2": {"kind": "collocated", "model": "m", "collocated": {"replicas": 1, "tp": 2}},
        "c-1xtp1": {"kind": "collocated", "model": "m", "collocated": {"replicas": 1, "tp": 1}},
        "c-other": {"kind": "collocated", "model": "other-model", "collocated": {"replicas": 1, "tp": 2}},
    }, {})
    ctx = SessionContext.from_options(options(), root, nodes=ONE_X8)
    assert ctx.reference_for(ctx.all_topologies["pd-x"]).name == "c-1xtp2"  # same model and TP, fewest GPUs
    assert ctx.reference_for(ctx.all_topologies["pd-orphan"]) is None


# -- external backend --------------------------------------------------------------------------

def test_external_backend_needs_a_url():
    with pytest.raises(SpecError) as e:
        repo_ctx(CPU_ONLY, backend="external")
    assert "--external-url" in str(e.value)


def test_external_backend_serves_one_stand_in_topology():
    ctx = repo_ctx(CPU_ONLY, backend="external", external_url="http://127.0.0.1:1")
    topologies = ctx.topologies()
    assert [t.name for t in topologies] == ["external"]
    assert ctx.skip_reason(topologies[0]) is None


# -- --engine-arg ------------------------------------------------------------------------------

def test_engine_args_lay_over_every_topology():
    ctx = repo_ctx(ONE_X8, engine_arg=["enforce_eager=true", "max_num_seqs=128",
                                       "compilation_config={level: 0}"])
    assert ctx.engine_overrides == {"enforce_eager": True, "max_num_seqs": 128, "compilation_config": {"level": 0}}
    t = ctx.all_topologies["colloc-2xtp1"]
    assert t.engine_kwargs["enforce_eager"] is True and t.engine_kwargs["compilation_config"] == {"level": 0}
    from pdperf.backends.ray_serve import engine_kwargs
    kw = engine_kwargs(t, "collocated", ROOT / "nowhere")
    assert kw["max_num_seqs"] == 128 and kw["tensor_parallel_size"] == 1
    assert repo_ctx(ONE_X8).all_topologies["colloc-2xtp1"].engine_kwargs == {}


@pytest.mark.parametrize("bad,needle", [("enforce_eager", "expected KEY=VALUE"), ("=1", "expected KEY=VALUE"),
                                        ("x={a: [", "not valid YAML")])
def test_bad_engine_arg_names_the_fix(bad, needle):
    with pytest.raises(SpecError, match=re.escape(needle)) as e:
        repo_ctx(ONE_X8, engine_arg=[bad])
    assert "--engine-arg" in str(e.value)


def test_pd_shares_a_deployment_group_with_its_reference():
    ctx = repo_ctx(ONE_X8, topology=["pd-1p1-1d1-pack", "colloc-2xtp1"])
    pd, ref = ctx.all_topologies["pd-1p1-1d1-pack"], ctx.all_topologies["colloc-2xtp1"]
    assert ctx.reference_for(pd).name == "colloc-2xtp1"
    assert ctx.deployment_group(pd) == ctx.deployment_group(ref) == "colloc-2xtp1"
    other = ctx.all_topologies["colloc-1xtp2"]
    assert ctx.deployment_group(other) == "colloc-1xtp2"


def test_engine_args_merge_nested_dicts():
    # gpu-testmachine.sh switches FlashInfer's all-reduce fusion off (NVLink multicast); a user's
    # own compilation_config must not drop that.
    ctx = repo_ctx(ONE_X8, engine_arg=["compilation_config={pass_config: {fuse_allreduce_rms: false}}",
                                       "compilation_config={level: 0}"])
    assert ctx.engine_overrides == {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}, "level": 0}}
    from pdperf.specs import Topology
    t = Topology(name="x", kind="collocated", model="m", collocated={"tp": 2},
                 engine_kwargs={"compilation_config": {"cudagraph_capture_sizes": [1, 2]}, "max_num_seqs": 64})
    from pdperf.selection import with_engine_overrides
    merged = with_engine_overrides(t, ctx.engine_overrides).engine_kwargs
    assert merged == {"max_num_seqs": 64, "compilation_config": {
        "cudagraph_capture_sizes": [1, 2], "pass_config": {"fuse_allreduce_rms": False}, "level": 0}}


def test_vllm_cli_flags_keep_false_and_nested_dicts():
    from pdperf.backends.vllm_proc import _flags

    assert _flags({"enforce_eager": True, "enable_prefix_caching": False, "seed": None, "max_num_seqs": 8,
                   "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}) == [
        "--enforce-eager", "--no-enable-prefix-caching", "--max-num-seqs", "8",
        "--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}']


def test_vllm_backend_gpu_ledger_never_hands_one_gpu_to_two_live_deployments():
    """4x H100: a PD topology and its collocated reference both started on GPU 0 before the ledger."""
    from pdperf.backends.vllm_proc import GpuLedger
    from pdperf.errors import ClusterError

    ledger = GpuLedger(["2", "3", "5", "7"])  # this process's CUDA_VISIBLE_DEVICES, not 0..3
    assert ledger.take("pd-1p1-1d1-pack", 2) == ["2", "3"]
    assert ledger.take("colloc-1xtp1", 1) == ["5"]
    with pytest.raises(ClusterError, match=r"colloc-1xtp2: needs 2 GPUs, 1 of 4 free \(held by colloc-1xtp1, "
                                           r"pd-1p1-1d1-pack\); deploy fewer topologies at once"):
        ledger.take("colloc-1xtp2", 2)
    ledger.release("pd-1p1-1d1-pack")
    assert ledger.take("colloc-1xtp2", 2) == ["2", "3"]


def test_grouped_order_runs_each_deployment_groups_tests_together():
    from pdperf.selection import grouped_order

    # pytest's own order: smoke by function then topology, then the sweeps (seen on 4x H100: the pool
    # would have redeployed colloc-2xtp1 after the PD group's reference had evicted it)
    c2, ref, pd = ("colloc-2xtp1", "colloc-2xtp1"), ("colloc-1xtp1", "colloc-1xtp1"), ("colloc-1xtp1", "pd-1p1-1d1")
    keys = [c2, pd, None, ref, c2, pd, ref, c2]
    assert grouped_order(keys) == [0, 4, 7, 1, 5, 3, 6, 2]  # c2's tests; then the PD group: PD's, its reference's
    assert grouped_order([None, None]) == [0, 1] and grouped_order([]) == []
