"""The KV path between prefill and decode engines, from the engines' own metrics.

The reference study's worst failure: UCX fell back to TCP across nodes and TTFT went from
0.36 s to 64 s while decode looked healthy. So a PD point's KV transfers are measured from
NIXL's Prometheus metrics on the engines (``vllm:nixl_*``): how many, how many bytes, how
long; the study's rule of thumb is that healthy EFA SRD moves 10-12 GB/s and below 1 GB/s
across nodes means the wrong transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pdperf.results import Telemetry


def kv_bandwidth_gb_s(telemetry: Telemetry) -> float | None:
    """Mean NIXL KV transfer bandwidth of a point (GB/s): bytes / (mean transfer time x transfers)."""
    if not telemetry.kv_bytes or not telemetry.kv_transfer_time_s or not telemetry.kv_transfers:
        return None
    return float(telemetry.kv_bytes) / (float(telemetry.kv_transfer_time_s) * float(telemetry.kv_transfers)) / 1e9


def kv_bandwidth_note(telemetry: Telemetry) -> str:
    """"" when the transfer time is exact; else the bandwidth range its histogram buckets prove
    (Ray's metrics export keeps no sums: ``kv_transfer_time_s`` is then a bucket-midpoint estimate)."""
    if "kv_transfer_time_s" not in telemetry.estimated_means:
        return ""
    lo_s, hi_s = telemetry.mean_bounds("kv_transfer_time_s") or (None, None)
    gb = float(telemetry.kv_bytes or 0) / float(telemetry.kv_transfers or 1) / 1e9
    slow = f"{gb / hi_s:.2f}" if hi_s else "0"
    proven = f"{slow} to {gb / lo_s:.2f} GB/s" if lo_s else f"at least {slow} GB/s"
    return f" (estimated: the transfer time comes from Ray's histogram buckets, which prove only {proven})"


# --------------------------------------------------------------------------- which transport moved the KV
#
# NIXL moves KV through UCX; UCX picks a transport per peer and memory type, silently. With
# UCX_PROTO_INFO=y (set for every PD engine: pdperf.engine) UCX prints the protocol it selected as
# a table, once per selection, into the engine's output:
#
#   | ucp_context_0 self cfg#0 | remote memory read by ucp_get* from host memory to host |
#   |                   0..inf | zero-copy                                | cma/memory      |
#
# The transport cell names the transport/device pairs ("cma/memory", "tcp/lo", "52% on tcp/lo
# and 48% on tcp/eth0", "rc_mlx5/mlx5_0:1", "srd/rdmap16s27"). The KV is moved by one-sided
# reads and writes (ucp_get*/ucp_put*) to a peer ("intra-node" or "inter-node" in the header; a
# "self" table is an agent talking to itself), so those tables say where it went. Seen on the CPU
# stack (NIXL 1.3.2's UCX, Ray Serve LLM): "ucp_context_0 intra-node cfg#0 | remote memory write
# by ucp_put* from host memory to host ... | cma/memory", in the replicas' stdout.

_RMA_HEADER = re.compile(r"ucp_context_\d+ (?P<scope>\S+) cfg#\d+ \| remote memory (?P<op>read|write) by ucp_(?:get|put)"
                         r"\S*(?P<rest>[^|]*)")
_MEMORY = re.compile(r"(?:into|from) (?P<a>[a-z_]+) memory (?:from|to) (?P<b>[a-z_]+)")
_ROW = re.compile(r"^[^|]*\|\s*[0-9.]+(?:\.\.(?:[0-9.]+|inf))?\s*\|[^|]*\|\s*(?P<cell>[^|]+?)\s*\|\s*$")
_TRANSPORT = re.compile(r"\b([a-z][a-z0-9_]*)/([A-Za-z0-9_:.\-]+)")

#: What each UCX transport is, for the check of a placement's expectation.
TRANSPORT_CLASSES: dict[str, str] = {
    "tcp": "tcp",
    "cma": "intra-node", "sysv": "intra-node", "posix": "intra-node", "xpmem": "intra-node", "knem": "intra-node",
    "self": "intra-node", "cuda_ipc": "intra-node", "cuda_copy": "intra-node", "rocm_ipc": "intra-node",
    "gdr_copy": "intra-node",
    "rc": "rdma", "rc_verbs": "rdma", "rc_mlx5": "rdma", "dc": "rdma", "dc_mlx5": "rdma", "ud": "rdma",
    "ud_verbs": "rdma", "ud_mlx5": "rdma", "srd": "efa", "efa": "efa",
}


def transport_class(transport: str) -> str:
    """``"tcp/eth0"`` -> ``"tcp"``; ``"cma/memory"`` -> ``"intra-node"``; unknown -> ``"other"``."""
    return TRANSPORT_CLASSES.get(transport.split("/", 1)[0], "other")


@dataclass(frozen=True)
class TransportUse:
    """One transport of one UCX remote-memory table: which operation, on which memory.

    A table is selected per operation and memory type, so one PD pair can show several: on one
    GPU without an NVLink peer, the push connector's writes of device memory and other tables
    of the same agents may land on different transports. Naming the operation and memory says
    which of them a slow transport carried (the KV lives in device memory on GPU engines, in
    host memory on the CPU stack)."""

    transport: str
    op: str  # "read" (ucp_get*: the decode side pulls) or "write" (ucp_put*: the prefill side pushes)
    local_memory: str  # the memory type on this agent's side ("host", "cuda", ... ; "" if not printed)
    remote_memory: str

    def label(self) -> str:
        mem = f" {self.local_memory}->{self.remote_memory}" if self.local_memory else ""
        return f"{self.transport} ({self.op}{mem})"


def parse_proto_uses(text: str) -> list[TransportUse]:
    """Every transport of UCX's remote-memory (get/put) tables towards a peer in ``text``, with
    the table's operation and memory types, in first-seen order (each distinct use once)."""
    found: dict[TransportUse, None] = {}
    table: tuple[str, str, str] | None = None
    for line in text.splitlines():
        if "ucp_context" in line:  # a table's header: a remote-memory one, towards a peer (not to itself)?
            m = _RMA_HEADER.search(line)
            table = None
            if m is not None and m.group("scope") != "self":
                mem = _MEMORY.search(m.group("rest"))
                # a read's header says "into <local> memory from <remote>", a write's "from <local> memory to <remote>"
                table = (m.group("op"), mem.group("a") if mem else "", mem.group("b") if mem else "")
            continue
        if table is None:
            continue
        m = _ROW.match(line)
        if m:
            for name, device in _TRANSPORT.findall(m.group("cell")):
                found.setdefault(TransportUse(f"{name}/{device}", *table), None)
    return list(found)


def transports_of(uses: list[TransportUse]) -> list[str]:
    """The distinct transports of ``uses``, in first-seen order."""
    return list(dict.fromkeys(u.transport for u in uses))


def parse_proto_info(text: str) -> list[str]:
    """Transports of UCX's remote-memory (get/put) protocol tables in ``text``, in first-seen order."""
    return transports_of(parse_proto_uses(text))


@dataclass(frozen=True)
class KvPathExpectation:
    """Which transports a PD topology's placement should move its KV over, and why."""

    allowed: tuple[str, ...]  # transport classes
    why: str

    @classmethod
    def of(cls, placement: str, ucx_tls: str | None, spans_nodes: bool) -> KvPathExpectation:
        forced = [t.strip() for t in (ucx_tls or "").split(",") if t.strip()]
        if forced and all(transport_class(t) in ("tcp", "intra-node") for t in forced) and "tcp" in forced:
            return cls(("tcp", "intra-node"), f"UCX_TLS={ucx_tls} forces TCP")
        if spans_nodes or placement == "spread":
            return cls(("rdma", "efa"), "prefill and decode on different nodes: RDMA or EFA, never TCP")
        return cls(("intra-node", "rdma", "efa"), "prefill and decode on one node: shared memory, CUDA IPC or RDMA")


def kv_path_problem(transports: list[str], expectation: KvPathExpectation,
                    uses: list[TransportUse] | None = None) -> str | None:
    """Why the KV's transports break the expectation (naming them, with the operation and memory
    each carried when ``uses`` says), or None."""
    if not transports:
        return None
    wrong = [t for t in transports if transport_class(t) not in expectation.allowed]
    if not wrong:
        return None
    fix = ("check UCX_TLS and UCX_NET_DEVICES on the engines (docs/DEBUGGING.md, 'KV over TCP')"
           if any(transport_class(t) == "tcp" for t in wrong) else "see docs/DEBUGGING.md")
    named = [u.label() for u in uses or [] if u.transport in wrong] or wrong
    return f"KV moved over {', '.join(named)}, but {expectation.why}: {fix}"


def kv_failures(telemetry: Telemetry) -> list[str]:
    """Failed NIXL transfers and expired KV leases in a point (each fails it)."""
    out = []
    if telemetry.kv_failed_transfers:
        out.append(f"{telemetry.kv_failed_transfers:g} failed KV transfers (vllm:nixl_num_failed_transfers)")
    if telemetry.kv_expired_requests:
        out.append(f"{telemetry.kv_expired_requests:g} requests whose KV lease expired before decode read it "
                   "(vllm:nixl_num_kv_expired_reqs)")
    return out


def annotate_kv_path(telemetry: Telemetry, engine_output: str, *, placement: str, ucx_tls: str | None,
                     spans_nodes: bool) -> Telemetry:
    """``telemetry`` with the transports that moved a PD point's KV (from the engines' output) and,
    where they break what the placement expects, the problem naming them."""
    uses = parse_proto_uses(engine_output)
    transports = transports_of(uses)
    expectation = KvPathExpectation.of(placement, ucx_tls, spans_nodes)
    return telemetry.model_copy(update={"kv_transports": transports, "kv_transport_uses": [u.label() for u in uses],
                                        "kv_path_expected": expectation.why,
                                        "kv_path_problem": kv_path_problem(transports, expectation, uses)})


def kv_path_summary(telemetry: Telemetry) -> str:
    """One line on a PD point's KV path: transport, transfers, size, time and bandwidth (with the
    proven range where Ray's buckets are all there is), and the problem if any."""
    # with several transports, which operation and memory each carried is the point of the line
    over = telemetry.kv_transport_uses if len(telemetry.kv_transports) > 1 and telemetry.kv_transport_uses \
        else telemetry.kv_transports
    parts = [("KV over " + ", ".join(over)) if telemetry.kv_transports
             else "KV transport not identified (no UCX protocol table in the engines' output)"]
    if telemetry.kv_transfers:
        n = telemetry.kv_transfers
        size = f", {float(telemetry.kv_bytes or 0) / n / 1e6:.2f} MB each" if telemetry.kv_bytes else ""
        parts.append(f"{n:g} transfers{size}")
    if telemetry.kv_transfer_time_s:
        est = "~" if "kv_transfer_time_s" in telemetry.estimated_means else ""
        parts.append(f"{est}{telemetry.kv_transfer_time_s * 1e3:.2f} ms per transfer")
    bw = kv_bandwidth_gb_s(telemetry)
    if bw is not None:
        parts.append(f"{bw:.2f} GB/s{kv_bandwidth_note(telemetry)}")
    if telemetry.nixl_metrics_present == [] and not telemetry.kv_transfers:
        parts.append("no NIXL metrics scraped")
    problems = kv_failures(telemetry) + ([telemetry.kv_path_problem] if telemetry.kv_path_problem else [])
    if problems:
        parts.append("PROBLEM: " + "; ".join(problems))
    return " · ".join(parts)
