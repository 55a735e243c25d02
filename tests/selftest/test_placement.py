"""Placement against fake clusters: which node each role lands on, or why the cluster cannot hold it.

``plan`` never talks to Ray, so every cluster shape that matters (one 8-GPU node, two with and
without EFA, uneven nodes, a CPU-only head, no GPU at all) is a list of ``NodeInfo`` here.
The reasons are what users read in the skip table, so they are asserted word for word where
the brief of the suite names them.
"""

from __future__ import annotations

import pytest

from pdperf.cluster import NodeInfo
from pdperf.placement import NODE_RESOURCE_AMOUNT, plan
from pdperf.specs import Topology

pytestmark = pytest.mark.selftest


def gpu_node(i: int, gpus: int = 8, *, efa: int = 0, head: bool = False) -> NodeInfo:
    return NodeInfo(node_id=f"node{i}", ip=f"10.0.0.{i}", gpus=gpus, cpus=96.0, gpu_model="H100", efa_devices=efa,
                    is_head=head)


CPU_HEAD = NodeInfo(node_id="head", ip="10.0.0.100", gpus=0, cpus=8.0, is_head=True)
ONE_X8 = [gpu_node(1)]
TWO_X8 = [gpu_node(1), gpu_node(2)]
TWO_X8_EFA = [gpu_node(1, efa=32), gpu_node(2, efa=32)]
UNEVEN_8_4 = [gpu_node(1, 4), gpu_node(2, 8)]  # the smaller node has the lower IP on purpose


def pd(name: str, p_tp: int, d_tp: int, *, p_reps: int = 1, d_reps: int = 1, **kw) -> Topology:
    return Topology(name=name, kind="pd", model="m", prefill={"replicas": p_reps, "tp": p_tp},
                    decode={"replicas": d_reps, "tp": d_tp}, **kw)


def colloc(name: str, tp: int, replicas: int = 1, **kw) -> Topology:
    return Topology(name=name, kind="collocated", model="m", collocated={"replicas": replicas, "tp": tp}, **kw)


def assert_pinned(p, role: str, ip: str, tp: int) -> None:
    rp = p.roles[role]
    assert rp.node_ip == ip
    pg = rp.placement_group_config
    assert pg["strategy"] == "STRICT_PACK"
    assert len(pg["bundles"]) == tp
    for bundle in pg["bundles"]:
        assert bundle == {"CPU": 1, "GPU": 1, f"node:{ip}": NODE_RESOURCE_AMOUNT}


# -- pack --------------------------------------------------------------------------------------

def test_pack_on_one_node_pins_both_roles_there():
    p = plan(pd("pd-1p4-1d4-pack", 4, 4, placement="pack"), ONE_X8)
    assert p.feasible, p.reason
    assert_pinned(p, "prefill", "10.0.0.1", 4)
    assert_pinned(p, "decode", "10.0.0.1", 4)
    assert p.nodes == ["10.0.0.1"]


def test_pack_on_two_nodes_is_deterministic():
    t = pd("pd-2p2-1d4-pack", 2, 4, p_reps=2, placement="pack")
    p = plan(t, TWO_X8)
    assert p.feasible, p.reason
    assert p.nodes == ["10.0.0.1"]  # equal nodes: the lowest IP
    assert plan(t, list(reversed(TWO_X8))) == p


def test_pack_picks_the_node_that_fits_not_the_first_listed():
    p = plan(pd("pd-1p4-1d4-pack", 4, 4, placement="pack"), UNEVEN_8_4)
    assert p.feasible, p.reason
    assert p.nodes == ["10.0.0.2"]  # the 8-GPU node


def test_pack_larger_than_any_node():
    p = plan(pd("pd-1p4-1d8-pack", 4, 8, placement="pack"), TWO_X8)  # 12 GPUs, 16 in the cluster
    assert not p.feasible
    assert p.reason == "topology pd-1p4-1d8-pack: placement 'pack' needs 12 GPUs on one node, the largest node has 8"
    assert p.roles == {}


def test_pack_skips_a_cpu_only_head():
    p = plan(pd("pd-1p1-1d1-pack", 1, 1, placement="pack"), [CPU_HEAD, gpu_node(7)])
    assert p.feasible, p.reason
    assert p.nodes == ["10.0.0.7"]


# -- spread ------------------------------------------------------------------------------------

def test_spread_puts_prefill_and_decode_on_different_nodes():
    p = plan(pd("pd-1p4-1d4-spread-tcp", 4, 4, placement="spread"), TWO_X8)
    assert p.feasible, p.reason
    assert_pinned(p, "prefill", "10.0.0.1", 4)
    assert_pinned(p, "decode", "10.0.0.2", 4)
    assert plan(pd("pd-1p4-1d4-spread-tcp", 4, 4, placement="spread"), list(reversed(TWO_X8))) == p


def test_spread_on_one_node_needs_two():
    p = plan(pd("pd-1p4-1d4-spread-tcp", 4, 4, placement="spread"), ONE_X8)
    assert not p.feasible
    assert "needs 2 GPU nodes, found 1" in p.reason


def test_spread_does_not_count_a_cpu_only_head():
    p = plan(pd("pd-1p1-1d1-spread", 1, 1, placement="spread"), [CPU_HEAD, gpu_node(1)])
    assert "needs 2 GPU nodes, found 1" in p.reason


def test_spread_on_uneven_nodes_searches_both_ways():
    # Prefill TP4 fits either node, decode TP8 only the 8-GPU one: prefill goes to the 4-GPU node.
    p = plan(pd("pd-1p4-1d8-spread", 4, 8, placement="spread"), UNEVEN_8_4)
    assert p.feasible, p.reason
    assert p.roles["prefill"].node_ip == "10.0.0.1"
    assert p.roles["decode"].node_ip == "10.0.0.2"


def test_spread_where_no_pair_of_nodes_fits():
    p = plan(pd("pd-2p4-1d4-spread", 4, 4, p_reps=2, placement="spread"), UNEVEN_8_4)
    assert p.feasible, p.reason  # 2x TP4 prefill on the 8-GPU node, decode on the 4-GPU one
    # 12 GPUs for 12 needed, but decode's two TP4 engines need 8 GPUs on one node.
    p = plan(pd("pd-1p4-2d4-spread", 4, 4, d_reps=2, placement="spread"), [gpu_node(i, 4) for i in (1, 2, 3)])
    assert not p.feasible
    assert "needs a node with 4 GPUs for prefill and another with 8 for decode" in p.reason


# -- EFA ---------------------------------------------------------------------------------------

def test_needs_efa_without_efa_names_the_nodes():
    p = plan(pd("pd-1p4-1d4-spread-efa", 4, 4, placement="spread", needs_efa=True), TWO_X8)
    assert not p.feasible
    assert "needs EFA on 2 GPU node(s)" in p.reason
    assert "10.0.0.1" in p.reason and "10.0.0.2" in p.reason


def test_needs_efa_with_efa_on_one_node_only():
    nodes = [gpu_node(1, efa=32), gpu_node(2)]
    p = plan(pd("pd-1p4-1d4-spread-efa", 4, 4, placement="spread", needs_efa=True), nodes)
    assert not p.feasible
    assert "nodes without EFA: 10.0.0.2" in p.reason
    assert "10.0.0.1" not in p.reason


def test_needs_efa_with_efa_everywhere():
    p = plan(pd("pd-1p4-1d4-spread-efa", 4, 4, placement="spread", needs_efa=True), TWO_X8_EFA)
    assert p.feasible, p.reason
    assert {p.roles["prefill"].node_ip, p.roles["decode"].node_ip} == {"10.0.0.1", "10.0.0.2"}


def test_needs_efa_pack_uses_the_efa_node():
    nodes = [gpu_node(1), gpu_node(2, efa=32)]
    p = plan(pd("pd-1p4-1d4-pack-efa", 4, 4, placement="pack", needs_efa=True), nodes)
    assert p.feasible, p.reason
    assert p.nodes == ["10.0.0.2"]


# -- capacity ----------------------------------------------------------------------------------

def test_tp_wider_than_the_largest_node():
    p = plan(colloc("colloc-1xtp8", 8), [gpu_node(1, 4), gpu_node(2, 4)])
    assert not p.feasible
    assert p.reason == "topology colloc-1xtp8: needs TP 8 on one node, the largest node has 4 GPUs"


def test_more_gpus_than_the_cluster():
    p = plan(colloc("colloc-4xtp4", 4, replicas=4), ONE_X8)
    assert not p.feasible
    assert p.reason == "topology colloc-4xtp4: needs 16 GPUs, the cluster has 8 on 1 node(s)"


def test_no_gpu_at_all():
    p = plan(pd("pd-1p1-1d1-pack", 1, 1, placement="pack"), [CPU_HEAD])
    assert not p.feasible
    assert p.reason == "topology pd-1p1-1d1-pack: needs 2 GPUs, the cluster has 0 (no GPU node)"
    assert not plan(colloc("colloc-1xtp1", 1), []).feasible


# -- any: first-fit over the nodes, each TP group on one node ----------------------------------

@pytest.mark.parametrize("replicas,fits", [(3, True), (4, True), (5, False)])
def test_any_first_fit_tp4_engines_on_two_x8(replicas, fits):
    p = plan(colloc(f"colloc-{replicas}xtp4", 4, replicas=replicas), TWO_X8)
    assert p.feasible is fits, p.reason
    if fits:
        rp = p.roles["collocated"]
        assert rp.node_ip is None  # not pinned: Ray places each engine's STRICT_PACK group
        assert rp.placement_group_config == {"bundles": [{"CPU": 1, "GPU": 1}] * 4, "strategy": "STRICT_PACK"}
    else:
        assert "needs 20 GPUs, the cluster has 16" in p.reason


def test_any_fragmented_cluster_does_not_fit():
    # 12 GPUs for 12 needed, but only two TP4 groups fit whole on nodes of 8, 2 and 2.
    p = plan(colloc("colloc-3xtp4", 4, replicas=3), [gpu_node(1, 8), gpu_node(2, 2), gpu_node(3, 2)])
    assert not p.feasible
    assert "do not fit" in p.reason and "[4, 4, 4]" in p.reason and "[8, 2, 2]" in p.reason


def test_any_uneven_nodes_fit():
    p = plan(pd("pd-3p4-1d4", 4, 4, p_reps=2), UNEVEN_8_4)
    assert p.feasible, p.reason
    assert p.nodes == []


# -- CPU device --------------------------------------------------------------------------------

def test_cpu_bundles_have_cpu_only():
    t = pd("cpu-pd-1p1-1d1", 1, 1, device="cpu")
    for nodes in ([CPU_HEAD], ONE_X8, []):
        p = plan(t, nodes)
        assert p.feasible, p.reason
        for role in ("prefill", "decode"):
            assert p.roles[role].node_ip is None
            assert p.roles[role].placement_group_config == {"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"}


def test_cpu_needs_a_cpu_slot_per_engine():
    tiny = NodeInfo(node_id="tiny", ip="10.0.0.9", cpus=1.0, is_head=True)
    p = plan(pd("cpu-pd-1p1-1d1", 1, 1, device="cpu"), [tiny])
    assert not p.feasible
    assert "needs 2 CPU slots" in p.reason


def test_gpu_counts_ingress_and_engine_logical_cpus():
    # 8 ingress replicas + 2 engines x (1 GPU bundle + 1 replica actor) = 12 logical CPUs.
    t = colloc("colloc-2xtp1", 1, replicas=2, ingress_replicas=8)
    node = NodeInfo(node_id="n", ip="10.0.0.1", gpus=4, cpus=11.0, gpu_model="H100")
    p = plan(t, [node])
    assert not p.feasible
    assert "needs 12 Ray logical CPUs (8 ingress replica(s) and 2 engine(s)), the cluster has 11" in p.reason
    assert "--num-cpus" in p.reason
    assert plan(t, [NodeInfo(node_id="n", ip="10.0.0.1", gpus=4, cpus=12.0, gpu_model="H100")]).feasible


def test_ray_llm_config_gives_each_gpu_role_its_own_tcpstore_port_base(tmp_path):
    """vLLM 0.26's Ray executor scans for its torch.distributed port from VLLM_DP_MASTER_PORT + 100 (default:
    port 100 on every engine): engines starting together collided (EADDRINUSE) on 4x H100."""
    from pdperf.backends import ray_replica
    from pdperf.backends.ray_serve import TCPSTORE_BASES, llm_config

    t = pd("pd-1p1-1d1", 1, 1)
    p = plan(t, [gpu_node(1)])
    prefill = llm_config(t, "prefill", tmp_path, p, local=False, tcpstore_base=TCPSTORE_BASES[0])
    decode = llm_config(t, "decode", tmp_path, p, local=False, tcpstore_base=TCPSTORE_BASES[1])
    assert prefill["runtime_env"]["env_vars"]["VLLM_DP_MASTER_PORT"] == "23000"
    assert decode["runtime_env"]["env_vars"]["VLLM_DP_MASTER_PORT"] == "23160"
    # ... and asks each replica to pick a free port of its own (pdperf/backends/ray_replica.py)
    assert prefill["runtime_env"]["env_vars"][ray_replica.MARK] == ray_replica.MARK_VALUE
    own = pd("pd-own", 1, 1, env={"VLLM_DP_MASTER_PORT": "40000"})  # a topology's own env wins
    own_env = llm_config(own, "prefill", tmp_path, plan(own, [gpu_node(1)]), local=False,
                         tcpstore_base=23000)["runtime_env"]["env_vars"]
    assert own_env["VLLM_DP_MASTER_PORT"] == "40000" and ray_replica.MARK not in own_env
    assert all(b + 131 < 32768 and not 20000 <= b + 100 < 22200 for b in TCPSTORE_BASES)  # below ephemeral ports
