"""Result schema: per-request records, per-point results, atomic JSON files.

A point's result keeps every request's raw timings (not only percentiles), the environment
it ran in and the server's telemetry, so that a later comparison can test significance on
samples and refuse to compare across different hardware. Files carry ``schema_version``
and are written atomically (temp file + rename): a crash never leaves half a result.

The stages hand each other typed objects: the load generator's :class:`RequestRecord` (a
plain dataclass: it is written once per chunk on the hot path), the point's
:class:`PointSummary` (distributions, throughput, SLO results, failures), what the client
measured of itself (:class:`ClientReport`), the server's telemetry (:class:`Telemetry`) and
where it ran (:class:`Environment`). The last two name every field the suite reads; the
diagnostic series they carry (per-URL counters, GPU and host-CPU samples) and keys another
version wrote are kept as they came (``extra="allow"``), so a file written by a newer or older
version loads without losing them. Schema 1 files load as they are (their keys are the same).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pdperf.errors import PdperfError

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
#: result files are meant to be shared: readable by everyone, writable by their owner
FILE_MODE = 0o644


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Distribution(_Closed):
    """One metric's samples in a point: count, mean, percentiles (None without samples)."""

    n: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    p99_9: float | None = Field(None, alias="p99.9")
    p99_ci: tuple[float, float] | None = None

    def stat(self, statistic: str) -> float | None:
        """``"p50"``, ``"p99.9"``, ``"mean"``: the statistic by its summary name."""
        if statistic == "p99.9":
            return self.p99_9
        value = getattr(self, statistic, None) if statistic in ("mean", "p50", "p90", "p95", "p99") else None
        return float(value) if value is not None else None


class Throughput(_Closed):
    req_per_s: float = 0.0
    input_tok_per_s: float = 0.0
    output_tok_per_s: float = 0.0
    output_tok_per_s_per_gpu: float | None = None


class SloResult(_Closed):
    """One SLO of a point: the percentile observed over every measured request (a failed one
    counted as unbounded: ``observed`` None and ``failed_requests`` set when they decide it)."""

    slo: str
    metric: str
    percentile: float
    bound: float
    observed: float | None
    passed: bool
    failed_requests: int | None = None


class PointSummary(_Closed):
    """What a point's requests add up to (pdperf.metrics.summarize)."""

    requests: int
    requests_ok: int
    requests_failed: int
    errors: dict[str, int] = Field(default_factory=dict)
    error_examples: dict[str, str] = Field(default_factory=dict)
    error_budget: float = 0.0
    duration_s: float
    metrics: dict[str, Distribution]
    throughput: Throughput
    goodput_req_per_s: float = 0.0
    slo_attainment: float | None = None
    slos: list[SloResult] = Field(default_factory=list)

    def stat(self, metric: str, statistic: str) -> float | None:
        """``stat("ttft_ms", "p99")``; None when the point has no samples of the metric."""
        d = self.metrics.get(metric)
        return d.stat(statistic) if d is not None else None


class ClientReport(_Closed):
    """What the load generator measured of itself and asked of the server (pdperf.loadgen.runner)."""

    cpu_s: float = 0.0
    cpu_s_per_1k_tokens: float | None = None
    processes: int = 1
    worker_cpu_s: list[float] = Field(default_factory=list)
    parent_cpu_s: float = 0.0
    busiest_worker_cpu_util: float | None = None
    loop_lag_p99_ms: float | None = None
    loop_lag_max_ms: float | None = None
    token_accounting: dict[str, int] = Field(default_factory=dict)
    output_length_mismatch: int = 0
    input_length_mismatch: int = 0
    clock: str = ""
    event_loop: str = ""
    aiohttp: str = ""
    salt: str = ""
    prefix_cache_reset: str = ""
    prompt_build_s: float | None = None
    request_options: dict[str, Any] = Field(default_factory=dict)


class Telemetry(_Open):
    """The servers' own numbers over the measured phase (pdperf.loadgen.telemetry.summarize): the
    fields the suite reads, typed; per-URL values (``by_url``), raw counter deltas (``raw``), the
    client host's GPU (``gpu``) and serving-process CPU (``host_cpu``) samples and gauge maxima
    ride along for the report."""

    server_ttft_mean_s: float | None = None
    server_itl_mean_s: float | None = None
    server_tpot_mean_s: float | None = None
    server_e2e_mean_s: float | None = None
    queue_time_s: float | None = None
    prefill_time_s: float | None = None
    decode_time_s: float | None = None
    inference_time_s: float | None = None
    kv_transfer_time_s: float | None = None
    kv_post_time_s: float | None = None
    server_requests: float | None = None
    kv_transfers: float | None = None
    kv_bytes: float | None = None
    kv_bytes_per_transfer: float | None = None
    kv_descriptors_per_transfer: float | None = None  # NIXL descriptors (one UCX operation each)
    preemptions: float | None = None
    kv_failed_transfers: float | None = None
    kv_expired_requests: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    prefix_cache_hit_rate: float | None = None
    # means that are Ray's bucket-midpoint estimates, and what the buckets prove of each
    estimated_means: list[str] = Field(default_factory=list)
    mean_bounds_s: dict[str, list[float | None]] = Field(default_factory=dict)
    counter_resets: list[str] = Field(default_factory=list)
    scrape_errors: dict[str, str] = Field(default_factory=dict)
    nixl_metrics_present: list[str] = Field(default_factory=list)
    # PD: the UCX transports that moved the KV (pdperf.network), what the placement expects, and
    # the problem when they differ (it fails the point)
    kv_transports: list[str] = Field(default_factory=list)
    # each transport with the operation and memory of its table ("tcp/lo (read cuda->cuda)")
    kv_transport_uses: list[str] = Field(default_factory=list)
    kv_path_expected: str | None = None
    kv_path_problem: str | None = None
    kv_path_note: str | None = None  # unexpected transports seen only at other sizes than the KV's
    samples_during: int = 0
    by_url: dict[str, dict[str, Any]] = Field(default_factory=dict)
    raw: dict[str, dict[str, Any]] = Field(default_factory=dict)
    gpu: dict[str, Any] = Field(default_factory=dict)
    host_cpu: dict[str, Any] = Field(default_factory=dict)

    def mean_bounds(self, key: str) -> tuple[float | None, float | None] | None:
        b = self.mean_bounds_s.get(key)
        return (b[0], b[1]) if b else None


class Environment(_Open):
    """Where and how a point ran (pdperf.environment.fingerprint and the deployment's own keys;
    ``deploy_*`` keys and GPU details another version adds ride along)."""

    hardware_id: str | None = None
    backend: str | None = None
    nodes: int | None = None
    gpu_nodes: int | None = None
    gpus: int | None = None
    gpu_model: str | None = None
    gpus_per_node: list[int] = Field(default_factory=list)
    efa: dict[str, int] = Field(default_factory=dict)
    cpu_model: str | None = None
    cpu_cores: int | None = None
    python: str | None = None
    ray: str | None = None
    vllm: str | None = None
    nixl: str | None = None
    torch: str | None = None
    ucx: str | None = None
    settings: dict[str, str] = Field(default_factory=dict)
    git_sha: str | None = None
    host: str | None = None
    topology_kind: str | None = None
    startup_s: float | None = None
    restarts_at_startup: int | None = None
    engine_mode: str | None = None
    engine_overrides: str | None = None
    request_options: str | None = None
    model: str | None = None
    co_resident: str | None = None

    def scalars(self) -> dict[str, Any]:
        """Every key with a scalar value (what a comparison of two environments lists)."""
        return {k: v for k, v in self.model_dump().items() if not isinstance(v, (dict, list))}


@dataclass
class RequestRecord:
    """One request's life, in seconds on the load generator's monotonic clock.

    ``scheduled_s`` is when the load model wanted the request sent; latency clocks start
    there, so client-side queueing (``sent_s - scheduled_s``) is visible, not hidden.
    ``chunk_times_s`` are arrival times of content-bearing stream chunks and
    ``chunk_tokens`` the tokens each carried (several per chunk is normal).
    """

    index: int
    scheduled_s: float
    sent_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # kind: http_4xx, http_5xx, timeout, connection, stream, empty
    error_detail: str | None = None
    warmup: bool = False
    worker: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token_s is not None and self.end_s is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(**d)


@dataclass
class PointResult:
    """One load point of one topology under one workload.

    The typed members also take their JSON form (a dict) at construction, so a file or a test
    can hand over plain data: it is validated into the type here, once.
    """

    topology: str
    workload: str
    point_id: str
    sweep_kind: str  # concurrency | rate | single
    point_value: float
    gpus: int
    started_at: str
    duration_s: float
    records: list[RequestRecord]
    summary: PointSummary
    telemetry: Telemetry = field(default_factory=Telemetry)
    environment: Environment = field(default_factory=Environment)
    flags: list[str] = field(default_factory=list)  # e.g. "replica_restart_during_load"
    client: ClientReport = field(default_factory=ClientReport)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.summary, dict):
            self.summary = PointSummary.model_validate(self.summary)
        if isinstance(self.telemetry, dict):
            self.telemetry = Telemetry.model_validate(self.telemetry)
        if isinstance(self.environment, dict):
            self.environment = Environment.model_validate(self.environment)
        if isinstance(self.client, dict):
            self.client = ClientReport.model_validate(self.client)

    @property
    def id(self) -> str:
        return f"{self.topology}/{self.workload}/{self.point_id}"

    def to_dict(self) -> dict[str, Any]:
        return {"topology": self.topology, "workload": self.workload, "point_id": self.point_id,
                "sweep_kind": self.sweep_kind, "point_value": self.point_value, "gpus": self.gpus,
                "started_at": self.started_at, "duration_s": self.duration_s,
                "records": [asdict(r) for r in self.records],
                "summary": self.summary.model_dump(by_alias=True),
                "telemetry": self.telemetry.model_dump(), "environment": self.environment.model_dump(),
                "flags": list(self.flags), "client": self.client.model_dump(),
                "schema_version": SCHEMA_VERSION, "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointResult:
        d = dict(d)
        d.pop("id", None)
        version = d.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"result schema_version {version} is not one of {READABLE_SCHEMA_VERSIONS}; "
                             "re-run the point with this version of pdperf")
        d["schema_version"] = SCHEMA_VERSION
        d["records"] = [RequestRecord.from_dict(r) for r in d["records"]]
        return cls(**d)


class WriteError(PdperfError, OSError):
    """A file could not be written for a reason the user fixes (a full disk, a folder not writable):
    the message names the file, the filesystem and the fix; ``errno`` is the system's. Still an
    OSError, so code that handles failed writes keeps handling it."""

    def __str__(self) -> str:  # the message as written, not OSError's "[Errno 28] ...: 'file'"
        return str(self.args[0]) if self.args else super().__str__()


#: write failures that are the disk's or the folder's, not the suite's
_USER_FIXABLE = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "read-only file system"}


def _write_error(e: OSError, path: Path) -> WriteError | None:
    """``e`` as one line naming the file, its filesystem and the fix; None for other failures."""
    what = _USER_FIXABLE.get(e.errno or 0)
    if what is None:
        return None
    device = _filesystem_of(path)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text = f"{what} on {device} writing {path}; free space there or write somewhere else"
    elif e.errno == errno.EROFS:
        text = f"{device} is a {what}: cannot write {path}; write somewhere else"
    else:
        text = (f"{what} writing {path}: {_existing_parent(path)} is not writable by this user; "
                "make it writable or write somewhere else")
    err = WriteError(text)
    err.errno, err.filename = e.errno, str(path)  # for callers that branch on them
    return err


def _existing_parent(path: Path) -> Path:
    """The nearest folder of ``path`` that exists (where a failed mkdir or create happened)."""
    p = Path(os.path.abspath(path)).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _filesystem_of(path: Path) -> str:
    """``/mnt/reports (tmpfs)``: the mount point holding ``path`` and what is mounted there."""
    mount = _existing_parent(path)
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    source = ""
    try:
        with open("/proc/self/mounts") as f:  # the last entry for a mount point is the one in effect
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1] == str(mount):
                    source = parts[0] if parts[0] == parts[2] else f"{parts[0]}, {parts[2]}"
    except OSError:
        pass  # not Linux: the mount point alone names it
    return f"{mount} ({source})" if source else str(mount)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    A full disk or a folder that is not writable raises :class:`WriteError` (one line naming the
    file, the filesystem and the fix); the old file, if any, is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        err = _write_error(e, path)
        if err is None:
            raise
        raise err from None
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        err = _write_error(e, path) if isinstance(e, OSError) else None
        if err is None:
            raise
        raise err from None  # the close after a failed flush fails again: one error, not a chain of two


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def save_point(path: Path, result: PointResult) -> None:
    atomic_write_json(path, result.to_dict())


def load_point(path: Path) -> PointResult:
    return PointResult.from_dict(json.loads(Path(path).read_text()))
