"""What a session runs: topologies and workloads chosen from options, and what the cluster can hold.

Kept apart from pytest so it is unit-tested with fake node lists: given the options and the
cluster's nodes, which topologies run, which are skipped and why, and which sweep cases
(topology x workload x point) exist, each with an id that carries its coordinates.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdperf.backends.base import Deployment
from pdperf.cluster import ClusterShape, NodeInfo, detect_efa, local_cpu
from pdperf.errors import ClusterError, SpecError
from pdperf.placement import plan
from pdperf.specs import Topology, Workload, all_topologies, all_workloads


@dataclass(frozen=True)
class SweepCase:
    topology: Topology
    workload: Workload
    point: float
    requests: int

    @property
    def point_id(self) -> str:
        return self.workload.sweep.point_id(self.point)

    @property
    def id(self) -> str:
        return f"{self.topology.name}/{self.workload.name}/{self.point_id}"


def _match(name: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def local_nodes(sysfs: Path = Path("/sys")) -> list[NodeInfo]:
    """This machine as a one-node cluster (what a local Ray head or the vllm backend will see)."""
    gpus, model = 0, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []
        gpus = len(names)
        if names:
            model = next((tok for tok in names[0].replace("-", " ").split() if tok[:1] in "AHBL" and tok[1:2].isdigit()),
                         names[0])
    except (OSError, subprocess.TimeoutExpired):
        pass
    _, cores = local_cpu()
    return [NodeInfo(node_id="local", ip="127.0.0.1", gpus=gpus, cpus=float(max(cores, 8)), gpu_model=model,
                     efa_devices=len(detect_efa(sysfs)), is_head=True)]


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``--engine-arg KEY=VALUE`` items as a dict; VALUE is parsed as YAML (true, 128, {level: 0})."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"--engine-arg {item!r}: expected KEY=VALUE with a vLLM engine argument name as KEY, "
                            "e.g. --engine-arg enforce_eager=true")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--engine-arg {item!r}: VALUE is not valid YAML ({str(e).splitlines()[0]}); quote it, "
                            "e.g. --engine-arg 'compilation_config={level: 0}'") from None
        out = deep_merge(out, {key: value})
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``; where both hold a dict under one key, merged key by key (so
    ``compilation_config={level: 0}`` keeps another override's ``pass_config``)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def with_engine_overrides(t: Topology, overrides: dict[str, Any]) -> Topology:
    """The topology with ``overrides`` laid over its engine_kwargs (the topology itself if none)."""
    if not overrides:
        return t
    return t.model_copy(update={"engine_kwargs": deep_merge(t.engine_kwargs, overrides)})


@dataclass
class SessionContext:
    backend: str
    device: str
    topology_patterns: list[str]
    workload_patterns: list[str]
    ray_address: str | None = None
    model_override: str | None = None
    external_url: str | None = None
    external_model: str | None = None
    tokenizer: str | None = None
    deploy_timeout_s: float = 900.0
    max_alive: int = 2
    requests_scale: float = 1.0
    stream_batching_ms: int = 0
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    keep_deployments: bool = False
    prestart: bool = True
    planned: list[Topology] = field(default_factory=list)
    nodes: list[NodeInfo] = field(default_factory=list)
    all_topologies: dict[str, Topology] = field(default_factory=dict)
    all_workloads: dict[str, Workload] = field(default_factory=dict)
    cluster: Any = None
    pool: Any = None

    @classmethod
    def from_options(cls, opt: Any, root: Path, nodes: list[NodeInfo] | None = None) -> "SessionContext":
        ctx = cls(backend=opt.backend, device=opt.device, topology_patterns=list(opt.topology or []),
                  workload_patterns=list(opt.workload or []), ray_address=opt.ray_address,
                  model_override=opt.model, external_url=opt.external_url, external_model=opt.external_model,
                  tokenizer=opt.tokenizer, deploy_timeout_s=opt.deploy_timeout, max_alive=opt.max_alive,
                  requests_scale=opt.requests_scale, stream_batching_ms=opt.stream_batching_ms,
                  keep_deployments=getattr(opt, "keep_deployments", False),
                  prestart=not getattr(opt, "no_prestart", False),
                  engine_overrides=parse_engine_args(getattr(opt, "engine_arg", None) or []))
        if ctx.keep_deployments and not ctx.ray_address:
            raise SpecError("--keep-deployments needs --ray-address: a local Ray head ends with the session")
        ctx.all_topologies = {n: with_engine_overrides(t, ctx.engine_overrides)
                              for n, t in all_topologies(root / "topologies").items()}
        ctx.all_workloads = all_workloads(root / "workloads")
        unknown = [p for p in ctx.topology_patterns if not any(fnmatch.fnmatchcase(n, p) for n in ctx.all_topologies)]
        if unknown and ctx.backend != "external":
            raise SpecError(f"--topology {', '.join(unknown)}: no such topology in topologies/; known: "
                            f"{', '.join(sorted(ctx.all_topologies))}")
        unknown_wl = [p for p in ctx.workload_patterns if not any(fnmatch.fnmatchcase(n, p) for n in ctx.all_workloads)]
        if unknown_wl:
            raise SpecError(f"--workload {', '.join(unknown_wl)}: no such workload in workloads/; known: "
                            f"{', '.join(sorted(ctx.all_workloads))}")
        if ctx.backend == "external" and not ctx.external_url:
            raise SpecError("--backend external needs --external-url URL (the server's base URL)")
        if ctx.requests_scale <= 0:
            raise SpecError(f"--requests-scale {ctx.requests_scale}: must be > 0")
        ctx.nodes = nodes if nodes is not None else ctx._discover_nodes()
        if ctx.device == "auto":
            ctx.device = "gpu" if any(n.gpus for n in ctx.nodes) else "cpu"
        return ctx

    # -- cluster -------------------------------------------------------------------------------
    def _discover_nodes(self) -> list[NodeInfo]:
        if self.backend == "ray" and self.ray_address:
            self.connect()
            return self.cluster.nodes()
        return local_nodes()

    def connect(self) -> None:
        if self.backend != "ray" or self.cluster is not None:
            return
        from pdperf.backends.ray_serve import RayCluster

        self.cluster = RayCluster(self.ray_address).start()
        if self.ray_address:
            self.nodes = self.cluster.nodes()

    def disconnect(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def shape(self) -> ClusterShape:
        model, cores = local_cpu()
        return ClusterShape(nodes=list(self.nodes), cpu_model=model, cpu_cores=cores)

    def cluster_description(self) -> str:
        gpu_nodes = [n for n in self.nodes if n.gpus]
        if not gpu_nodes:
            return f"{len(self.nodes)} node(s), no GPU"
        return ", ".join(f"{n.ip}: {n.gpus}x {n.gpu_model or 'GPU'}{' +EFA' if n.has_efa else ''}" for n in gpu_nodes)

    # -- selection -----------------------------------------------------------------------------
    def _external_topology(self) -> Topology:
        return Topology(name="external", kind="collocated", device="cpu", model=self.tokenizer or "tiny-llama",
                        collocated={"replicas": 1, "tp": 1}, description=f"external server at {self.external_url}")

    def topologies(self, kind: str | None = None) -> list[Topology]:
        if self.backend == "external":
            picked = [t for n, t in self.all_topologies.items() if self.topology_patterns and _match(n, self.topology_patterns)]
            topos = picked[:1] or [self._external_topology()]
        else:
            topos = [t for n, t in sorted(self.all_topologies.items()) if _match(n, self.topology_patterns)]
        return [t for t in topos if kind is None or t.kind == kind]

    def workloads(self) -> list[Workload]:
        return [w for n, w in sorted(self.all_workloads.items())
                if _match(n, self.workload_patterns) and w.device in ("any", self.device)]

    def sweep_cases(self, sweep_kind: str | None = None) -> list[SweepCase]:
        # Topology first: consecutive cases share a deployment (a redeploy costs minutes).
        cases = []
        for t in self.topologies():
            if t.device != self.device and self.backend != "external":
                continue
            for w in self.workloads():
                if w.tier != "sweep" or (sweep_kind and w.sweep.kind != sweep_kind) or not _match(t.name, w.topologies):
                    continue
                for p in w.sweep.points:
                    cases.append(SweepCase(t, w, p, w.sweep.scaled_requests_at(p, self.requests_scale)))
        return cases

    def skip_reason(self, t: Topology) -> str | None:
        if self.backend == "external":
            return None
        if t.device == "cpu" and self.device == "gpu":
            return f"topology {t.name}: embedded-CPU topology; run it with --device cpu"
        p = plan(t, self.nodes)
        if not p.feasible:
            return p.reason
        if t.device == "gpu" and self.device == "cpu":
            return f"topology {t.name}: GPU topology; this run is --device cpu"
        if self.backend == "vllm" and t.nodes_needed > 1:
            return f"topology {t.name}: the vllm backend is single-node; 'spread' needs --backend ray"
        return None

    def prestart_set(self) -> list[Topology]:
        """Topologies to start side by side: those the session will use, if they all fit at once."""
        topos = list({t.name: t for t in self.planned}.values())
        if not self.prestart or len(topos) < 2 or len(topos) > self.max_alive:
            return []
        if sum(t.gpus for t in topos) > sum(n.gpus for n in self.nodes):
            return []
        return topos

    def reference_for(self, t: Topology) -> Topology | None:
        """The collocated topology whose greedy output a PD topology must reproduce."""
        if t.kind != "pd":
            return None
        assert t.decode is not None
        selected = {s.name for s in self.topologies()}
        candidates = [c for c in self.all_topologies.values()
                      if c.kind == "collocated" and c.device == t.device and c.model == t.model
                      and c.collocated is not None and c.collocated.tp == t.decode.tp]
        # Prefer one this session runs anyway (no extra deployment), then the smallest.
        return min(candidates, key=lambda c: (c.name not in selected, c.gpus, c.name), default=None)

    def deployment_group(self, t: Topology) -> str:
        """Tests that share deployments share a group (one pytest-xdist worker each, ``--dist
        loadgroup``): a PD topology goes with the collocated topology its greedy check compares
        against, so two workers never deploy the same Serve application."""
        ref = self.reference_for(t)
        return ref.name if ref is not None else t.name

    def model_for(self, t: Topology) -> str:
        return self.model_override if (self.model_override and t.device == "gpu") else t.model

    def deployment_for(self, t: Topology, log_dir: Path) -> Deployment:
        if self.backend == "ray":
            from pdperf.backends.ray_serve import RayServeDeployment

            if self.cluster is None:
                raise ClusterError("internal: the Ray cluster is not connected")
            return RayServeDeployment(t, self.cluster, model=self.model_for(t),
                                      stream_batching_interval_ms=self.stream_batching_ms, keep=self.keep_deployments)
        from pdperf.backends.vllm_proc import ExternalDeployment, VllmProcessDeployment

        if self.backend == "vllm":
            return VllmProcessDeployment(t, log_dir, model=self.model_for(t))
        assert self.external_url
        return ExternalDeployment(t, self.external_url, tokenizer=self.tokenizer, model_id=self.external_model)


def grouped_order(keys: list[tuple[str, str] | None]) -> list[int]:
    """The order to run tests in, given each one's (deployment group, topology), None for a test that
    uses no deployment: every group's tests together, and within a group each topology's, in the
    order they first appear; a test without a key keeps its place among the groups' first tests.
    Interleaved topologies (pytest orders smoke tests by function, then parameter) would make the
    pool tear down and redeploy whenever they do not all fit at once, minutes each on GPUs."""
    first_group: dict[str, int] = {}
    first_topo: dict[tuple[str, str], int] = {}
    sort_keys = []
    for i, k in enumerate(keys):
        if k is None:
            sort_keys.append((i, i, i))
        else:
            sort_keys.append((first_group.setdefault(k[0], i), first_topo.setdefault(k, i), i))
    return sorted(range(len(keys)), key=lambda i: sort_keys[i])


def item_topology(item: Any) -> Topology | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    value = callspec.params.get("sweep_case", callspec.params.get("topology"))
    if isinstance(value, SweepCase):
        return value.topology
    return value if isinstance(value, Topology) else None  # an empty parameter set gives NOTSET


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
