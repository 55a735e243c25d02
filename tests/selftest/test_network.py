"""The KV path: which UCX transport moved the KV (parsed from UCX's protocol tables), what a
placement expects, and how a PD topology shares one GPU.

The CPU table is recorded from the decode replica of cpu-pd-1p1-1d1 on the embedded stack
(Ray Serve LLM, NIXL's UCX); the others follow UCX's format with the transports of the
cluster (EFA's srd, TCP across nodes, CUDA IPC on one GPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdperf.cluster import NodeInfo
from pdperf.engine import engine_kwargs
from pdperf.network import (
    KvPathExpectation,
    annotate_kv_path,
    kv_failures,
    kv_path_problem,
    kv_path_summary,
    parse_proto_info,
    parse_proto_uses,
    transport_class,
)
from pdperf.placement import plan as place
from pdperf.results import Telemetry
from pdperf.specs import Topology

pytestmark = pytest.mark.selftest

DATA = Path(__file__).parent / "data" / "ucx"


def table(scope: str, op: str, *cells: str, prefix: str = "[1796290375.4] [host:9648 :0]   ") -> str:
    rows = [f"{prefix}+--------------------------------+---------------------------------+",
            f"{prefix}| ucp_context_0 {scope} cfg#1 | {op} |",
            f"{prefix}+--------------------------------+----------------------+----------+"]
    rows += [f"{prefix}|                         0..inf | zero-copy            | {c} |" for c in cells]
    return "\n".join(rows)


GET = "remote memory read by ucp_get*(multi) into host memory from host"
PUT = "remote memory write by ucp_put* from host memory to host"
AM = "active message by ucp_am_send* from host memory"


def test_recorded_cpu_decode_kv_over_cma():
    text = (DATA / "proto-info-cpu-decode.txt").read_text()
    assert parse_proto_info(text) == ["cma/memory"]  # the AM tables (tcp/lo) are control traffic, not KV


def test_self_and_active_message_tables_are_not_the_kv():
    text = "\n".join([table("self", PUT, "cma/memory"), table("intra-node", AM, "tcp/lo"),
                      table("inter-node", GET, "srd/rdmap16s27")])
    assert parse_proto_info(text) == ["srd/rdmap16s27"]


def test_split_cells_and_ray_prefixes():
    text = "\n".join([table("inter-node", GET, "52% on tcp/eth0 and 48% on tcp/ens5", prefix="(Decode pid=77) "),
                      table("inter-node", PUT, "rc_mlx5/mlx5_0:1")])
    assert parse_proto_info(text) == ["tcp/eth0", "tcp/ens5", "rc_mlx5/mlx5_0:1"]


GPU_GET = "remote memory read by ucp_get* into cuda memory from cuda"
GPU_PUT = "remote memory write by ucp_put* from cuda memory to cuda"


def test_each_transport_with_its_operation_and_memory():
    """One GPU, no NVLink peer, the push connector: UCX showed cma/memory, tcp/lo and cuda_ipc/cuda
    for one PD pair (H200, 2026-12-03); which table each came from is what tells a slow KV from
    a slow side channel."""
    text = "\n".join([table("intra-node", PUT, "cma/memory"), table("intra-node", GPU_GET, "tcp/lo"),
                      table("intra-node", GPU_PUT, "cuda_ipc/cuda")])
    uses = parse_proto_uses(text)
    assert [u.label() for u in uses] == ["cma/memory (write host->host)", "tcp/lo (read cuda->cuda)",
                                         "cuda_ipc/cuda (write cuda->cuda)"]
    out = annotate_kv_path(Telemetry(kv_transfers=32, kv_bytes=32 * 84e6, kv_transfer_time_s=0.036), text,
                           placement="pack", ucx_tls=None, spans_nodes=False)
    assert out.kv_transports == ["cma/memory", "tcp/lo", "cuda_ipc/cuda"]
    assert out.kv_path_problem and out.kv_path_problem.startswith("KV moved over tcp/lo (read cuda->cuda), but")
    assert kv_path_summary(out).startswith("KV over cma/memory (write host->host), tcp/lo (read cuda->cuda), "
                                           "cuda_ipc/cuda (write cuda->cuda) · 32 transfers")


def test_recorded_cpu_table_memory():
    uses = parse_proto_uses((DATA / "proto-info-cpu-decode.txt").read_text())
    assert [u.label() for u in uses] == ["cma/memory (write host->host)", "cma/memory (read host->host)"]


def test_no_tables_no_transports():
    assert parse_proto_info("INFO vLLM started\n| not | a table |") == []


@pytest.mark.parametrize(("transport", "cls"), [
    ("tcp/lo", "tcp"), ("cma/memory", "intra-node"), ("cuda_ipc/cuda", "intra-node"), ("srd/rdmap16s27", "efa"),
    ("rc_mlx5/mlx5_0:1", "rdma"), ("weird/x", "other")])
def test_transport_classes(transport, cls):
    assert transport_class(transport) == cls


def test_pack_expects_a_local_path_and_names_tcp():
    exp = KvPathExpectation.of("pack", None, spans_nodes=False)
    assert kv_path_problem(["cma/memory"], exp) is None
    assert kv_path_problem(["cuda_ipc/cuda"], exp) is None
    problem = kv_path_problem(["tcp/lo"], exp)
    assert problem and "tcp/lo" in problem and "UCX_TLS" in problem and "one node" in problem


def test_spread_never_tcp():
    exp = KvPathExpectation.of("spread", None, spans_nodes=True)
    assert kv_path_problem(["srd/rdmap16s27"], exp) is None
    problem = kv_path_problem(["srd/rdmap16s27", "tcp/eth0"], exp)
    assert problem and "tcp/eth0" in problem and "srd" not in problem.split(",")[0]
    assert kv_path_problem(["cma/memory"], exp)  # across nodes shared memory cannot be the KV's path


def test_forced_tcp_expects_tcp():
    exp = KvPathExpectation.of("spread", "tcp", spans_nodes=True)
    assert kv_path_problem(["tcp/eth0"], exp) is None
    assert "UCX_TLS=tcp" in exp.why
    assert kv_path_problem([], exp) is None  # nothing identified is not a wrong transport (the network test fails it)


def test_annotate_and_summary():
    text = table("intra-node", GET, "tcp/lo")
    tel = Telemetry(kv_transfers=24, kv_bytes=24 * 6e6, kv_transfer_time_s=0.012)
    out = annotate_kv_path(tel, text, placement="pack", ucx_tls=None, spans_nodes=False)
    assert out.kv_transports == ["tcp/lo"] and out.kv_path_problem and "tcp/lo" in out.kv_path_problem
    line = kv_path_summary(out)
    assert line.startswith("KV over tcp/lo · 24 transfers, 6.00 MB each · 12.00 ms per transfer · 0.50 GB/s")
    assert "PROBLEM" in line
    assert "not identified" in kv_path_summary(Telemetry())


def test_failed_transfers_and_expired_leases_are_problems():
    assert kv_failures(Telemetry()) == []
    problems = kv_failures(Telemetry(kv_failed_transfers=2, kv_expired_requests=1))
    assert len(problems) == 2 and "failed KV transfers" in problems[0] and "expired" in problems[1]


# -- PD on one GPU ---------------------------------------------------------------------------------

def shared(fraction: float = 0.5, **kw) -> dict:
    return {"name": "pd-shared", "kind": "pd", "model": "m", "device": "gpu",
            "prefill": {"tp": 1, "gpu_fraction": fraction}, "decode": {"tp": 1, "gpu_fraction": fraction}, **kw}


def test_shared_gpu_topology_counts_one_gpu_and_packs_on_it():
    t = Topology(**shared())
    assert t.gpus == 1 and t.shares_gpu
    p = place(t, [NodeInfo(node_id="n", ip="10.0.0.1", gpus=1, cpus=16.0, gpu_model="H200", is_head=True)])
    assert p.feasible, p.reason
    bundles = [b for r in p.roles.values() for b in r.placement_group_config["bundles"]]
    assert [b["GPU"] for b in bundles] == [0.5, 0.5]
    assert engine_kwargs(t, "prefill", Path("/m"))["gpu_memory_utilization"] == 0.45


def test_the_repo_single_gpu_pd_topology_fits_one_gpu():
    from pdperf.specs import all_topologies

    t = all_topologies()["pd-1p1-1d1-1gpu"]
    assert t.gpus == 1 and "network" in t.tags
    assert place(t, [NodeInfo(node_id="n", ip="10.0.0.1", gpus=1, cpus=16.0, is_head=True)]).feasible


@pytest.mark.parametrize(("change", "words"), [
    ({"decode": {"tp": 2, "gpu_fraction": 0.5}}, "tp: 1"),
    ({"decode": {"tp": 1}}, "gpu_fraction below 1"),
    ({"prefill": {"tp": 1, "gpu_fraction": 0.6}}, "more than all of it"),
    ({"placement": "spread"}, "cannot be spread"),
])
def test_sharing_rules_are_named(change, words):
    with pytest.raises(ValueError, match=words):
        Topology(**{**shared(), **change})
