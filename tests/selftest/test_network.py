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
    TransportUse,
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


def table(scope: str, op: str, *cells: str, prefix: str = "[1796290375.4] [host:9648 :0]   ",
          sizes: tuple[str, ...] = ()) -> str:
    """A UCX protocol table: one row per cell, over 0..inf unless ``sizes`` gives each row's range."""
    rows = [f"{prefix}+--------------------------------+---------------------------------+",
            f"{prefix}| ucp_context_0 {scope} cfg#1 | {op} |",
            f"{prefix}+--------------------------------+----------------------+----------+"]
    rows += [f"{prefix}| {size:>30} | zero-copy            | {c} |" for c, size in zip(cells, sizes or ("0..inf",) * len(cells))]
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


def test_row_sizes_in_ucx_units():
    """UCX writes a row's range in its own units where a bound is a multiple of 1024 ("0..8K");
    such rows are parsed too (a missed row could hide a TCP lane)."""
    text = table("intra-node", GPU_GET, "tcp/lo", "cuda_ipc/cuda", "tcp/lo", sizes=("0..8K", "8193..1M", "1048577..inf"))
    uses = parse_proto_uses(text)
    assert [u.label() for u in uses] == ["tcp/lo (read cuda->cuda)", "cuda_ipc/cuda (read cuda->cuda, 8193..1M)"]
    text = table("intra-node", GPU_GET, "tcp/lo", "cuda_ipc/cuda", sizes=("0", "1..8K"))
    assert [(u.min_bytes, u.max_bytes) for u in parse_proto_uses(text)] == [(0, 0), (1, 8192)]


@pytest.mark.parametrize(("lo", "hi", "desc", "carries"), [
    (0, 8192, (65536.0, 65536.0, 65536.0), False),    # control-sized rows below half the descriptor
    (0, 8192, (12000.0, 12000.0, 12000.0), True),     # reaches half of it
    (8193, None, (65536.0, 65536.0, 65536.0), True),
    (262145, None, (65536.0, 65536.0, 65536.0), False),  # only far larger messages
    (0, 8192, (32768.0, 8192.0, 65536.0), True),     # Ray's buckets leave the size 8-64K: can't rule it out
    (0, 1024, (32768.0, 8192.0, 65536.0), False),
    (0, 8192, None, True),        # the descriptor size unknown: judged
])
def test_a_use_carries_the_kv_by_size(lo, hi, desc, carries):
    assert TransportUse("tcp/lo", "read", "cuda", "cuda", lo, hi).carries(desc) is carries


def ray_kv(transfers: int, bytes_bucket: tuple[float, float], desc_bucket: tuple[float, float]) -> Telemetry:
    """A Ray point's KV telemetry: every transfer in one bucket of each histogram, means at midpoints."""
    return Telemetry(kv_transfers=float(transfers), kv_bytes=transfers * sum(bytes_bucket) / 2,
                     kv_bytes_per_transfer=sum(bytes_bucket) / 2, kv_descriptors_per_transfer=sum(desc_bucket) / 2,
                     kv_transfer_time_s=0.0375,
                     estimated_means=["kv_transfer_time_s", "kv_bytes_per_transfer", "kv_descriptors_per_transfer"],
                     mean_bounds_s={"kv_transfer_time_s": [0.025, 0.05], "kv_bytes_per_transfer": list(bytes_bucket),
                                    "kv_descriptors_per_transfer": list(desc_bucket)})


def test_through_ray_the_sizes_are_ranges_and_say_so():
    """Ray's export keeps no sums: the KV's bytes (buckets x4 apart: 32-128 MiB) and descriptors
    (2000-4000) are midpoints, so the size, bandwidth and descriptor size are ranges."""
    tel = ray_kv(32, (2.0 ** 25, 2.0 ** 27), (2000.0, 4000.0))
    text = table("intra-node", GPU_GET, "tcp/lo", "cuda_ipc/cuda", sizes=("0..1K", "1025..inf"))
    out = annotate_kv_path(tel, text, placement="pack", ucx_tls=None, spans_nodes=False)
    line = kv_path_summary(out)
    assert "32 transfers, ~83.89 MB each in ~3000 descriptors of ~28.0 kB; Ray's buckets prove 8.4 kB to 67.1 kB" \
        in line
    assert "(estimated: the transfer time and the bytes come from Ray's histogram buckets, which prove only 0.67 to " \
        "5.37 GB/s)" in line
    assert out.kv_path_problem is None and out.kv_path_note and out.kv_path_note.startswith("tcp/lo (read cuda->cuda, 0..1K)")
    # a row up to 8K may have taken some of the KV as far as the buckets go: judged, and the message says why
    text = table("intra-node", GPU_GET, "tcp/lo", "cuda_ipc/cuda", sizes=("0..8K", "8193..inf"))
    out = annotate_kv_path(tel, text, placement="pack", ucx_tls=None, spans_nodes=False)
    assert out.kv_path_problem and out.kv_path_problem.startswith(
        "KV moved over tcp/lo (read cuda->cuda, 0..8K) (the KV's descriptors: ~28.0 kB; Ray's buckets prove 8.4 kB")


def test_tcp_for_small_messages_only_is_not_the_kv_path():
    """A one-GPU pair whose UCX sends sizes up to 8K over tcp/lo and larger ones over CUDA IPC:
    with NIXL's descriptors known (64 kB each) the KV went over CUDA IPC, and the report says
    why tcp/lo did not fail the point; without the descriptor count the check stays strict."""
    text = table("intra-node", GPU_GET, "tcp/lo", "cuda_ipc/cuda", sizes=("0..8K", "8193..inf"))
    tel = Telemetry(kv_transfers=32, kv_bytes=32 * 84e6, kv_bytes_per_transfer=84e6, kv_descriptors_per_transfer=1280,
                    kv_transfer_time_s=0.036)
    out = annotate_kv_path(tel, text, placement="pack", ucx_tls=None, spans_nodes=False)
    assert out.kv_path_problem is None
    assert out.kv_path_note == "tcp/lo (read cuda->cuda, 0..8K) took only other sizes than the KV's descriptors (65.6 kB)"
    line = kv_path_summary(out)
    assert "32 transfers, 84.00 MB each in 1280 descriptors of 65.6 kB" in line and out.kv_path_note in line
    strict = annotate_kv_path(tel.model_copy(update={"kv_descriptors_per_transfer": None}), text, placement="pack",
                              ucx_tls=None, spans_nodes=False)
    assert strict.kv_path_problem and strict.kv_path_problem.startswith("KV moved over tcp/lo (read cuda->cuda, 0..8K)")


def test_tcp_in_the_kv_sized_rows_fails_with_the_descriptor_known():
    text = table("intra-node", GPU_GET, "cuda_ipc/cuda", "tcp/lo", sizes=("0..8K", "8193..inf"))
    tel = Telemetry(kv_transfers=4, kv_bytes_per_transfer=84e6, kv_descriptors_per_transfer=1280)
    out = annotate_kv_path(tel, text, placement="pack", ucx_tls=None, spans_nodes=False)
    assert out.kv_path_problem and out.kv_path_problem.startswith("KV moved over tcp/lo (read cuda->cuda, 8193..inf)")
    assert out.kv_path_note is None


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


# The push point on one H200 (benchmarks/results/2026-12-03-h200-pd-1gpu/run-push-smoke-c4.tar.xz):
# Ray's export of the engines' NIXL histograms, sums at the buckets' midpoints as recorded.
H200_PUSH_BUCKETS = {
    "ray_vllm_nixl_bytes_transferred": (2684354560.0, {"33554432.0": 0, "134217728.0": 32, "+Inf": 32}),
    "ray_vllm_nixl_num_descriptors": (1620.0, {"30.0": 0, "50.0": 23, "75.0": 29, "100.0": 31, "200.0": 32, "+Inf": 32}),
    "ray_vllm_nixl_xfer_time_seconds": (1.155, {"0.01": 0, "0.025": 6, "0.05": 29, "0.075": 32, "+Inf": 32}),
}


def test_recorded_h200_push_point_sizes_are_ranges():
    """The report said "84 MB each" and 1.8-3.4 GB/s: 84 MB was Ray's midpoint of the 32-128 MiB
    bucket. What the buckets prove: 33.6-134 MB per transfer, 0.70-5.47 GB/s, and descriptors
    of 0.54-3.46 MB (one block of all layers: a 0..16K row cannot have taken them)."""
    from pdperf.loadgen.telemetry import summarize

    def text(scale: float) -> str:
        out = ""
        for name, (total, buckets) in H200_PUSH_BUCKETS.items():
            out += "".join(f'{name}_bucket{{engine="0",le="{le}"}} {v * scale}\n' for le, v in buckets.items())
            out += f'{name}_sum{{engine="0"}} {total * scale}\n{name}_count{{engine="0"}} {32 * scale}\n'
        return out

    tel = Telemetry.model_validate({k: v for k, v in summarize({"u": text(0)}, {"u": text(1)}).items()
                                    if k in Telemetry.model_fields})
    assert tel.kv_bytes_per_transfer == pytest.approx(80 * 2 ** 20)
    assert tel.mean_bounds("kv_bytes_per_transfer") == pytest.approx((2 ** 25, 2 ** 27))
    assert tel.mean_bounds("kv_descriptors_per_transfer") == pytest.approx((38.75, 62.5))
    rows = table("intra-node", GPU_PUT, "tcp/lo", "cuda_ipc/cuda", sizes=("0..16K", "16385..inf"))
    out = annotate_kv_path(tel, rows, placement="pack", ucx_tls=None, spans_nodes=False)
    line = kv_path_summary(out)
    assert "32 transfers, ~83.89 MB each in ~51 descriptors of ~1.66 MB; Ray's buckets prove 536.9 kB to 3.46 MB" in line
    assert "prove only 0.70 to 5.47 GB/s" in line
    assert out.kv_path_problem is None and out.kv_path_note
    emulated = table("intra-node", GPU_PUT, "tcp/lo", sizes=("0..inf",))  # UCX's "software emulation" row
    assert annotate_kv_path(tel, emulated, placement="pack", ucx_tls=None, spans_nodes=False).kv_path_problem
