"""The session runtime: one ledger, one factory, one pool per session; nothing connected until needed.

Runtimes here are given their nodes (as the plan's tests are), so none starts Ray or runs nvidia-smi.
"""

from __future__ import annotations

import pytest

from pdperf.backends.vllm_proc import GpuLedger, VllmProcessDeployment
from pdperf.cluster import NodeInfo
from pdperf.errors import ClusterError
from pdperf.session.options import EnvSwitches, SessionOptions, load_specs
from pdperf.session.runtime import SessionRuntime

pytestmark = pytest.mark.selftest

ONE_X4 = [NodeInfo(node_id="n1", ip="10.0.0.1", gpus=4, cpus=96.0, gpu_model="H100", is_head=True)]


def runtime(**options) -> SessionRuntime:
    opts = SessionOptions(**options)
    return SessionRuntime.open(opts, load_specs(opts), nodes=ONE_X4)


def test_given_nodes_nothing_is_connected_even_with_a_ray_address():
    rt = runtime(ray_address="10.0.0.1:6379")
    assert rt.cluster is None and rt.pool is None
    assert rt.nodes == ONE_X4 and rt.device == "gpu" and rt.backend == "ray"


def test_one_ledger_for_every_vllm_deployment_of_the_session(tmp_path):
    rt = runtime(backend="vllm", env=EnvSwitches(cuda_visible_devices="4,5,6,7", model_cache=tmp_path))
    a = rt.deployment_for(rt.all_topologies["pd-1p1-1d1-pack"], tmp_path)
    b = rt.deployment_for(rt.all_topologies["colloc-1xtp1"], tmp_path)
    assert isinstance(a, VllmProcessDeployment) and a.ledger is b.ledger is rt.ledger
    assert isinstance(rt.ledger, GpuLedger) and rt.ledger.devices() == ["4", "5", "6", "7"]
    assert a.model_cache == tmp_path


def test_ray_deployments_need_the_connection_first(tmp_path):
    rt = runtime()
    with pytest.raises(ClusterError, match="not connected"):
        rt.deployment_for(rt.all_topologies["colloc-1xtp1"], tmp_path)


def test_pool_follows_the_options_and_the_nodes(tmp_path):
    rt = runtime(backend="vllm", max_alive=3, deploy_timeout_s=120.0)
    pool = rt.start_pool(tmp_path, planned=[])  # nothing planned: nothing starts
    assert rt.pool is pool and (pool.max_alive, pool.timeout_s, pool.gpu_capacity) == (3, 120.0, 4)
    assert rt.close() == [] and rt.pool is pool  # kept: the report reads its start-up records after teardown


def test_tests_view_of_the_session():
    rt = runtime(engine_overrides={"max_num_seqs": 8}, env=EnvSwitches(git_sha="abc123"))
    assert rt.engine_overrides == {"max_num_seqs": 8} and rt.git_sha == "abc123"
    assert rt.all_topologies["colloc-1xtp1"].engine_kwargs == {"max_num_seqs": 8}
    assert "smoke-gpu" in rt.all_workloads
    assert rt.skip_reason(rt.all_topologies["cpu-colloc-1xtp1"]).startswith("topology cpu-colloc-1xtp1: ")
    assert rt.shape().hardware_id.startswith("h100-x4")
