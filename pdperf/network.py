"""The KV path between prefill and decode engines, from the engines' own metrics.

The reference study's worst failure: UCX fell back to TCP across nodes and TTFT went from
0.36 s to 64 s while decode looked healthy. So a PD point's KV transfers are measured from
NIXL's Prometheus metrics on the engines (``vllm:nixl_*``): how many, how many bytes, how
long; the study's rule of thumb is that healthy EFA SRD moves 10-12 GB/s and below 1 GB/s
across nodes means the wrong transport.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pdperf.results import Telemetry


def kv_bytes_per_transfer(telemetry: Telemetry) -> float | None:
    """Bytes per NIXL transfer: the bytes histogram's own mean (results before it was kept: the
    bytes over the transfer-time histogram's count)."""
    if telemetry.kv_bytes_per_transfer:
        return float(telemetry.kv_bytes_per_transfer)
    if telemetry.kv_bytes and telemetry.kv_transfers:
        return float(telemetry.kv_bytes) / float(telemetry.kv_transfers)
    return None


def kv_bandwidth_gb_s(telemetry: Telemetry) -> float | None:
    """Mean NIXL KV transfer bandwidth of a point (GB/s): bytes per transfer over the mean transfer time."""
    size = kv_bytes_per_transfer(telemetry)
    if not size or not telemetry.kv_transfer_time_s:
        return None
    return size / float(telemetry.kv_transfer_time_s) / 1e9


def _bounds(telemetry: Telemetry, key: str, exact: float) -> tuple[float, float | None]:
    """What Ray's buckets prove of the mean ``key`` (``exact`` both ways when it is exact)."""
    if key not in telemetry.estimated_means:
        return exact, exact
    lo, hi = telemetry.mean_bounds(key) or (None, None)
    return lo or 0.0, hi


def kv_bandwidth_bounds(telemetry: Telemetry) -> tuple[float, float] | None:
    """The KV bandwidth (GB/s) the metrics prove, ``(low, high)``: both the estimate when the
    transfer time and size are exact; Ray's bucket ranges otherwise (high may be inf)."""
    size = kv_bytes_per_transfer(telemetry)
    if not size or not telemetry.kv_transfer_time_s:
        return None
    b_lo, b_hi = _bounds(telemetry, "kv_bytes_per_transfer", size)
    t_lo, t_hi = _bounds(telemetry, "kv_transfer_time_s", float(telemetry.kv_transfer_time_s))
    low = b_lo / t_hi / 1e9 if t_hi else 0.0
    high = b_hi / t_lo / 1e9 if t_lo and b_hi else math.inf
    return low, high


def kv_bandwidth_note(telemetry: Telemetry) -> str:
    """"" when the transfer time and size are exact; else the bandwidth range the histogram buckets
    prove (Ray's metrics export keeps no sums: the means are then bucket-midpoint estimates, and
    the bytes' buckets are x4 apart)."""
    keys = ("kv_transfer_time_s", "kv_bytes_per_transfer")
    guessed = [k for k in keys if k in telemetry.estimated_means]
    bounds = kv_bandwidth_bounds(telemetry)
    if not guessed or bounds is None:
        return ""
    low, high = bounds
    slow = f"{low:.2f}" if low else "0"
    proven = f"{slow} to {high:.2f} GB/s" if math.isfinite(high) else f"at least {slow} GB/s"
    what = " and ".join(dict(zip(keys, ("the transfer time", "the bytes")))[k] for k in guessed)
    verb = "comes" if len(guessed) == 1 else "come"
    return f" (estimated: {what} {verb} from Ray's histogram buckets, which prove only {proven})"


def kv_bandwidth_floor(telemetry: Telemetry, floor_gb_s: float) -> tuple[str, str]:
    """Is the KV's bandwidth at least ``floor_gb_s``? ``("pass" | "fail" | "inconclusive", why)``:
    judged on what the metrics prove, so a Ray point whose bucket range straddles the floor is
    inconclusive rather than decided by a midpoint (the study's TCP fallback, ~0.06 GB/s, and
    healthy EFA, 10-12 GB/s, both fall clear of a 1 GB/s floor even with x4 buckets)."""
    bounds = kv_bandwidth_bounds(telemetry)
    if bounds is None:
        return "fail", "no KV bandwidth: no NIXL bytes or transfer time in the point's metrics"
    low, high = bounds
    bw = f"{kv_bandwidth_gb_s(telemetry) or 0:.2f} GB/s{kv_bandwidth_note(telemetry)}"
    if low >= floor_gb_s:
        return "pass", bw
    if high < floor_gb_s:
        return "fail", f"{bw}: below {floor_gb_s:g} GB/s"
    return "inconclusive", (f"{bw}: Ray's buckets cannot tell it from {floor_gb_s:g} GB/s (the `vllm` backend's "
                            "metrics are exact)")


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
# A row's message sizes: "0", "1..16515", "16516..inf", and, at a multiple of 1024, UCX's short
# units ("0..8K", "8193..1M": ucs_memunits_range_str).
_SIZE = r"\d+[KMGTPE]?|inf"
_ROW = re.compile(rf"^[^|]*\|\s*(?P<lo>{_SIZE})(?:\.\.(?P<hi>{_SIZE}))?\s*\|[^|]*\|\s*(?P<cell>[^|]+?)\s*\|\s*$")
_TRANSPORT = re.compile(r"\b([a-z][a-z0-9_]*)/([A-Za-z0-9_:.\-]+)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def _size(text: str) -> int | None:
    """UCX's size text in bytes ("8K" -> 8192); None for "inf"."""
    if text == "inf":
        return None
    return int(text.rstrip("KMGTPE")) * _UNITS[text.lstrip("0123456789")]


def _size_text(n: int | None) -> str:
    """Bytes in UCX's own notation (8192 -> "8K", None -> "inf")."""
    if n is None:
        return "inf"
    for unit in ("E", "P", "T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


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
    # the message sizes this transport took in the table (the span of its rows; None: no upper end)
    min_bytes: int = 0
    max_bytes: int | None = None

    def label(self) -> str:
        mem = f" {self.local_memory}->{self.remote_memory}" if self.local_memory else ""
        sizes = "" if (self.min_bytes, self.max_bytes) == (0, None) else \
            f", {_size_text(self.min_bytes)}..{_size_text(self.max_bytes)}"
        return f"{self.transport} ({self.op}{mem}{sizes})"

    def carries(self, descriptor: tuple[float, float, float] | None) -> bool:
        """Could this use have moved the KV's messages (``kv_descriptor_bytes``: estimate, low,
        high)? Unknown size: yes. Known: its rows reach within a factor 2 of the proven range
        (descriptors of one model are one or two sizes, so a row wholly below half the smallest,
        or above twice the largest, took none of them)."""
        if not descriptor:
            return True
        _, lo, hi = descriptor
        return (self.max_bytes is None or self.max_bytes >= lo / 2) and self.min_bytes <= hi * 2


def parse_proto_uses(text: str) -> list[TransportUse]:
    """Every transport of UCX's remote-memory (get/put) tables towards a peer in ``text``, with
    the table's operation and memory types, in first-seen order (each distinct use once)."""
    spans: dict[tuple[str, str, str, str], tuple[int, int | None]] = {}  # (transport, op, mems) -> sizes
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
            lo = _size(m.group("lo")) or 0
            hi = _size(m.group("hi")) if m.group("hi") else lo
            for name, device in _TRANSPORT.findall(m.group("cell")):
                key = (f"{name}/{device}", *table)
                a, b = spans.get(key, (lo, hi))  # the span of its rows (in two rows of a table it took both)
                spans[key] = (min(a, lo), None if b is None or hi is None else max(b, hi))
    return [TransportUse(*key, min_bytes=lo, max_bytes=hi) for key, (lo, hi) in spans.items()]


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


def kv_descriptor_bytes(telemetry: Telemetry) -> tuple[float, float, float] | None:
    """The KV's mean message size, ``(estimate, low, high)`` in bytes: NIXL posts one UCX operation
    per descriptor (a block of the KV: of one layer, or of all layers where vLLM keeps them
    together), so bytes over descriptors per transfer is what UCX's size ranges are judged
    against. Through Ray both are bucket estimates: low and high are what the buckets prove
    (high is inf past the last bucket)."""
    size, count = kv_bytes_per_transfer(telemetry), telemetry.kv_descriptors_per_transfer
    if not size or not count:
        return None
    b_lo, b_hi = _bounds(telemetry, "kv_bytes_per_transfer", size)
    d_lo, d_hi = _bounds(telemetry, "kv_descriptors_per_transfer", float(count))
    return size / count, (b_lo / d_hi if d_hi else 0.0), (b_hi / d_lo if b_hi is not None and d_lo else math.inf)


def kv_path_problem(transports: list[str], expectation: KvPathExpectation, uses: list[TransportUse] | None = None,
                    descriptor: tuple[float, float, float] | None = None) -> str | None:
    """Why the KV's transports break the expectation (naming them, with the operation, memory and
    sizes each took when ``uses`` says), or None. With the KV's descriptor size known
    (``kv_descriptor_bytes``), a transport whose rows took only other sizes did not move the KV
    and is not judged (kv_path_note names it)."""
    if not transports:
        return None
    if uses and descriptor:
        carried = {u.transport for u in uses if u.carries(descriptor)}
        transports = [t for t in transports if t in carried]
    wrong = [t for t in transports if transport_class(t) not in expectation.allowed]
    if not wrong:
        return None
    fix = ("check UCX_TLS and UCX_NET_DEVICES on the engines (docs/DEBUGGING.md, 'KV over TCP')"
           if any(transport_class(t) == "tcp" for t in wrong) else "see docs/DEBUGGING.md")
    named = [u.label() for u in uses or [] if u.transport in wrong and u.carries(descriptor)] or wrong
    sizes = f" (the KV's descriptors: {_size_range(descriptor)})" if descriptor else ""
    return f"KV moved over {', '.join(named)}{sizes}, but {expectation.why}: {fix}"


def kv_path_note(uses: list[TransportUse], expectation: KvPathExpectation,
                 descriptor: tuple[float, float, float] | None) -> str | None:
    """The unexpected transports that UCX selected only for sizes the KV's descriptors are not
    (its small control messages, say), so that a reader sees them and why they did not fail."""
    if not descriptor:
        return None
    spared = [u.label() for u in uses
              if transport_class(u.transport) not in expectation.allowed and not u.carries(descriptor)]
    if not spared:
        return None
    return f"{', '.join(spared)} took only other sizes than the KV's descriptors ({_size_range(descriptor)})"


def _size_range(descriptor: tuple[float, float, float]) -> str:
    est, lo, hi = descriptor
    if lo == hi:
        return _bytes_text(est)
    top = "no upper bound" if math.isinf(hi) else _bytes_text(hi)
    return f"~{_bytes_text(est)}; Ray's buckets prove {_bytes_text(lo)} to {top}"


def _bytes_text(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


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
    size = kv_descriptor_bytes(telemetry)
    return telemetry.model_copy(update={"kv_transports": transports, "kv_transport_uses": [u.label() for u in uses],
                                        "kv_path_expected": expectation.why,
                                        "kv_path_problem": kv_path_problem(transports, expectation, uses, size),
                                        "kv_path_note": kv_path_note(uses, expectation, size)})


def kv_path_summary(telemetry: Telemetry) -> str:
    """One line on a PD point's KV path: transport, transfers, size, time and bandwidth (with the
    proven range where Ray's buckets are all there is), and the problem if any."""
    # with several transports, which operation and memory each carried is the point of the line
    over = telemetry.kv_transport_uses if len(telemetry.kv_transports) > 1 and telemetry.kv_transport_uses \
        else telemetry.kv_transports
    parts = [("KV over " + ", ".join(over)) if telemetry.kv_transports
             else "KV transport not identified (no UCX protocol table in the engines' output)"]
    def approx(key: str) -> str:  # a Ray bucket-midpoint estimate is marked
        return "~" if key in telemetry.estimated_means else ""

    if telemetry.kv_transfers:
        b = kv_bytes_per_transfer(telemetry)
        size = f", {approx('kv_bytes_per_transfer')}{b / 1e6:.2f} MB each" if b else ""
        desc = kv_descriptor_bytes(telemetry)
        of = (f" in {approx('kv_descriptors_per_transfer')}{telemetry.kv_descriptors_per_transfer:.0f} descriptors"
              f" of {_size_range(desc)}" if desc else "")
        parts.append(f"{telemetry.kv_transfers:g} transfers{size}{of}")
    if telemetry.kv_transfer_time_s:
        parts.append(f"{approx('kv_transfer_time_s')}{telemetry.kv_transfer_time_s * 1e3:.2f} ms per transfer")
    bw = kv_bandwidth_gb_s(telemetry)
    if bw is not None:
        parts.append(f"{bw:.2f} GB/s{kv_bandwidth_note(telemetry)}")
    if telemetry.nixl_metrics_present == [] and not telemetry.kv_transfers:
        parts.append("no NIXL metrics scraped")
    problems = kv_failures(telemetry) + ([telemetry.kv_path_problem] if telemetry.kv_path_problem else [])
    if telemetry.kv_path_note:
        parts.append(telemetry.kv_path_note)
    if problems:
        parts.append("PROBLEM: " + "; ".join(problems))
    return " · ".join(parts)
