"""Typed specs: what a topology, a workload and an SLO are.

Every setup the suite can stand up is a YAML file validated by these models (extra keys
are refused), so a typo in a file is an error that names the file and the key instead of a
silently different benchmark. Ids carry the coordinates that matter when comparing runs:
``pd-1p4-1d4-pack`` / ``isl5000-osl250`` / ``c64``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdperf.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(_Strict):
    """A group of identical engines: how many replicas, the tensor-parallel size of each, and (TP 1
    only) the share of one GPU each engine takes: engines of a topology can share one GPU, so a
    single-GPU machine (a CI runner) runs PD and its KV path (CUDA IPC) at all."""

    replicas: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    gpu_fraction: float = Field(1.0, gt=0, le=1, description="share of one GPU per engine (TP 1 only)")

    @property
    def gpus(self) -> int | float:
        """GPUs the role takes: whole unless its engines share one (``gpu_fraction``)."""
        g = self.replicas * self.tp * self.gpu_fraction
        return int(g) if g == int(g) else g


class Topology(_Strict):
    """One deployment: collocated engines, or prefill and decode engines joined by NIXL."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str = ""
    kind: Literal["collocated", "pd"]
    device: Literal["cpu", "gpu"] = "gpu"
    model: str = Field(description="a key of pdperf.models.MODELS, or a path to a model folder")
    collocated: Role | None = None
    prefill: Role | None = None
    decode: Role | None = None
    placement: Literal["any", "pack", "spread"] = "any"
    kv_transport: Literal["UCX", "LIBFABRIC"] = "UCX"
    kv_connector: Literal["NixlConnector", "NixlPushConnector"] = Field(
        "NixlConnector", description="vLLM's NIXL connector: decode reads the KV (NixlConnector, vLLM's default) "
        "or prefill writes it (NixlPushConnector). UCX's cuda_ipc serves no reads on a GPU without NVLink "
        "peers, so reads between engines of one such node go over TCP (vLLM issue 52607); writes can use "
        "cuda_ipc (one H200: ~80x faster than reads, though UCX still showed tcp/lo beside it)")
    ucx_tls: str | None = Field(None, description="force UCX transports, e.g. 'tcp' (the study's slow path)")
    needs_efa: bool = False
    ingress_replicas: int = Field(1, ge=1)
    max_model_len: int = Field(4096, ge=16)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Topology:
        n = self.name
        if self.kind == "collocated":
            if self.collocated is None:
                raise ValueError(f"topology {n}: kind 'collocated' needs a 'collocated: {{replicas, tp}}' block")
            if self.prefill or self.decode:
                raise ValueError(f"topology {n}: kind 'collocated' takes no 'prefill'/'decode' blocks; use kind 'pd'")
            if self.placement == "spread":
                raise ValueError(f"topology {n}: placement 'spread' puts prefill and decode on different nodes; "
                                 "it needs kind 'pd' (use 'pack' or 'any' for collocated)")
        else:
            if self.prefill is None or self.decode is None:
                raise ValueError(f"topology {n}: kind 'pd' needs both 'prefill' and 'decode' blocks")
            if self.collocated is not None:
                raise ValueError(f"topology {n}: kind 'pd' takes no 'collocated' block")
            if self.prefill.tp > self.decode.tp:
                raise ValueError(
                    f"topology {n}: prefill TP {self.prefill.tp} > decode TP {self.decode.tp}, which NixlConnector "
                    f"does not support; make decode TP >= prefill TP")
        shared = [r for r in self.roles().values() if r.gpu_fraction < 1]
        if shared:
            if any(r.tp != 1 or r.gpu_fraction >= 1 for r in self.roles().values()):
                raise ValueError(f"topology {n}: gpu_fraction < 1 shares one GPU between engines: every role needs "
                                 "tp: 1 and a gpu_fraction below 1")
            if sum(r.replicas * r.gpu_fraction for r in self.roles().values()) > 1 + 1e-9:
                raise ValueError(f"topology {n}: engines sharing a GPU take more than all of it "
                                 f"(replicas x gpu_fraction sum to more than 1)")
            if self.placement == "spread":
                raise ValueError(f"topology {n}: engines sharing one GPU cannot be spread across nodes")
        if self.device == "cpu":
            for role in self.roles().values():
                if role.tp != 1:
                    raise ValueError(f"topology {n}: device 'cpu' serves with TP 1 only (got TP {role.tp})")
            if self.needs_efa or self.placement == "spread":
                raise ValueError(f"topology {n}: device 'cpu' runs on one machine; drop 'spread'/'needs_efa'")
        return self

    def roles(self) -> dict[str, Role]:
        if self.kind == "collocated":
            assert self.collocated is not None
            return {"collocated": self.collocated}
        assert self.prefill is not None and self.decode is not None
        return {"prefill": self.prefill, "decode": self.decode}

    @property
    def gpus(self) -> int:
        """GPUs the topology uses (0 on the CPU stack)."""
        if self.device == "cpu":
            return 0
        return math.ceil(sum(r.gpus for r in self.roles().values()) - 1e-9)

    @property
    def shares_gpu(self) -> bool:
        """Whether its engines share one GPU (``gpu_fraction`` below 1)."""
        return any(r.gpu_fraction < 1 for r in self.roles().values())

    @property
    def engines(self) -> int:
        return sum(r.replicas for r in self.roles().values())

    @property
    def nodes_needed(self) -> int:
        return 2 if self.placement == "spread" else 1


#: What an SLO can bound: the latency metrics with per-request samples, one number a request
#: (pdperf.metrics; chunk gaps are a reader's view of the stream, not a service level)
SLO_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms")


class SLO(_Strict):
    """An upper bound on one percentile of one latency metric, e.g. ``p99_ttft_ms <= 500``."""

    metric: str
    percentile: float = Field(99.0, gt=0, le=100)
    bound: float = Field(gt=0)

    @field_validator("metric")
    @classmethod
    def _latency_metric(cls, v: str) -> str:
        from pdperf.metrics import METRICS

        if v not in SLO_METRICS:
            known = ", ".join(SLO_METRICS)
            what = "a per-point number, not a latency with percentiles" if v in METRICS else "unknown"
            raise ValueError(f"metric '{v}' is {what}; an SLO bounds one of {known}")
        return v

    @classmethod
    def parse(cls, text: str) -> SLO:
        m = re.fullmatch(r"\s*p(\d+(?:\.\d+)?)_([a-z_]+_ms)\s*<=\s*(\d+(?:\.\d+)?)\s*", text)
        if not m:
            raise SpecError(f"SLO '{text}': expected the form 'p99_ttft_ms <= 500'")
        try:
            return cls(percentile=float(m.group(1)), metric=m.group(2), bound=float(m.group(3)))
        except ValidationError as e:
            why = "; ".join(f"{'.'.join(str(x) for x in d['loc'])}: {d['msg']}" for d in e.errors())
            raise SpecError(f"SLO '{text}': {why}") from None

    @property
    def key(self) -> str:
        p = f"{self.percentile:g}".replace(".", "")
        return f"p{p}_{self.metric}"

    def __str__(self) -> str:
        return f"{self.key} <= {self.bound:g}"


class Sweep(_Strict):
    """The load points of a workload: a concurrency list (closed loop) or a rate list (open loop)."""

    kind: Literal["concurrency", "rate"]
    points: list[float] = Field(min_length=1)
    requests_per_point: int | None = Field(None, ge=1, description="fixed count per point")
    requests_per_concurrency: int | None = Field(
        None, ge=1, description="count = this x concurrency (the study used 5)")
    min_requests: int = Field(1, ge=1)
    max_duration_s: float | None = Field(None, gt=0, description="a point stops sending after this long")
    warmup_requests: int = Field(0, ge=0)
    arrival: Literal["poisson", "gamma"] = "poisson"
    burstiness: float = Field(1.0, gt=0, description="gamma shape; 1.0 is Poisson, < 1 burstier")
    max_concurrency: int | None = Field(None, ge=1, description="cap on in-flight requests in open loop")
    stop_after_slo_failures: int = Field(2, ge=0, description="stop the sweep after this many consecutive SLO misses (0 never)")

    @model_validator(mode="after")
    def _check(self) -> Sweep:
        if self.kind == "concurrency" and any(p != int(p) or p < 1 for p in self.points):
            raise ValueError(f"sweep: concurrency points must be whole numbers >= 1, got {self.points}")
        if self.kind == "rate" and any(p <= 0 for p in self.points):
            raise ValueError(f"sweep: rate points must be > 0 req/s, got {self.points}")
        if self.requests_per_point is None and self.requests_per_concurrency is None:
            raise ValueError("sweep: set 'requests_per_point' or 'requests_per_concurrency'")
        return self

    def requests_at(self, point: float) -> int:
        if self.requests_per_point is not None:
            return max(self.requests_per_point, self.min_requests)
        assert self.requests_per_concurrency is not None
        return max(int(self.requests_per_concurrency * point), self.min_requests)

    def scaled_requests_at(self, point: float, scale: float = 1.0) -> int:
        """Measured requests of a point under ``--requests-scale`` (what a sweep test sends)."""
        return max(int(round(self.requests_at(point) * scale)), 1)

    def point_id(self, point: float) -> str:
        return f"c{int(point)}" if self.kind == "concurrency" else f"r{point:g}"


class Workload(_Strict):
    """What load to send: the dataset, lengths, sweep points and the SLOs to hold."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str = ""
    device: Literal["cpu", "gpu", "any"] = "any"
    tier: Literal["smoke", "sweep", "network"] = Field(
        "sweep", description="which tier uses it: only 'sweep' workloads are swept; smoke/network ones are named by tests")
    dataset: Literal["random", "prefix_repetition", "prefill_only", "decode_heavy"] = "random"
    isl: int = Field(ge=1, description="input tokens per request")
    osl: int = Field(ge=1, description="output tokens per request")
    prefix_len: int = Field(0, ge=0, description="shared prefix tokens (prefix_repetition)")
    num_prefixes: int = Field(1, ge=1)
    api: Literal["completions", "chat"] = "completions"
    seed: int = 0
    sweep: Sweep
    slos: list[SLO] = Field(default_factory=list)
    topologies: list[str] = Field(default_factory=lambda: ["*"],
                                  description="topology name patterns this workload sweeps (default all of its device)")
    request_timeout_s: float = Field(600.0, gt=0)
    stream_idle_timeout_s: float | None = Field(
        120.0, gt=0, description="a request whose stream sent no token for this long after its first one fails as "
                                 "'timeout' (stream stalled) instead of waiting out request_timeout_s; null: none. "
                                 "The default is far above any healthy inter-token gap (a preempted request's wait "
                                 "included) and far below the request timeout")
    error_budget: float = Field(
        0.0, ge=0, lt=1, description="share of a point's measured requests that may fail; above it the point is "
                                     "errored and fails without a performance verdict (default 0: any failure)")
    temperature: float | None = Field(
        None, ge=0, description="sampling temperature sent with every request; unset: the server's default, "
                                "as vllm bench serve sends")
    per_chunk_usage: bool = Field(
        False, description="ask for usage in every streamed chunk (continuous_usage_stats): exact tokens per chunk "
                           "even when the server merges tokens, at some server CPU per chunk")

    @field_validator("slos", mode="before")
    @classmethod
    def _parse_slos(cls, v: Any) -> Any:
        if isinstance(v, list):
            try:
                return [SLO.parse(x) if isinstance(x, str) else x for x in v]
            except SpecError as e:
                raise ValueError(str(e)) from None  # so the message carries the file and key
        return v

    @model_validator(mode="after")
    def _check(self) -> Workload:
        if self.dataset == "prefill_only" and self.osl != 1:
            raise ValueError(f"workload {self.name}: dataset 'prefill_only' needs osl: 1 (got {self.osl})")
        if self.dataset == "prefix_repetition" and not (0 < self.prefix_len < self.isl):
            raise ValueError(f"workload {self.name}: prefix_repetition needs 0 < prefix_len < isl "
                             f"(got prefix_len {self.prefix_len}, isl {self.isl})")
        return self

    @property
    def shape_id(self) -> str:
        return f"isl{self.isl}-osl{self.osl}"


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against docs/ARCHITECTURE.md (specs)"
        lines.append(f"  {loc}: {msg}")
    return f"{path}: invalid\n" + "\n".join(lines)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return data


SpecT = TypeVar("SpecT", "Topology", "Workload")


def _load_spec(path: Path, model: type[SpecT]) -> SpecT:
    data = load_yaml(path)
    data.setdefault("name", Path(path).stem)
    try:
        spec = model.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation(Path(path), e)) from None
    if spec.name != Path(path).stem:
        raise SpecError(f"{path}: name '{spec.name}' differs from the file name; rename one so they match")
    return spec


def load_topology(path: Path) -> Topology:
    return _load_spec(path, Topology)


def load_workload(path: Path) -> Workload:
    return _load_spec(path, Workload)


ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY_DIR = ROOT / "topologies"
WORKLOAD_DIR = ROOT / "workloads"


def all_topologies(directory: Path = TOPOLOGY_DIR) -> dict[str, Topology]:
    return {t.name: t for t in (load_topology(p) for p in sorted(directory.glob("*.yaml")))}


def all_workloads(directory: Path = WORKLOAD_DIR) -> dict[str, Workload]:
    return {w.name: w for w in (load_workload(p) for p in sorted(directory.glob("*.yaml")))}
