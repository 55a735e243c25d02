"""A session's options: what the user asked for, parsed and checked once, then passed on typed.

The planner, the runtime and the backends never see pytest's option namespace or
``os.environ``: they get a frozen ``SessionOptions``. So a mistake is found before anything
starts (one usage error naming the option, the value and the fix, never a traceback minutes
into a deployment), and a stage deep down cannot quietly read a switch that a unit test, the CLI
or a pytest-xdist worker does not set the same way.

The switches that live in the environment (``PDPERF_*`` set by the GPU scripts around pytest,
Ray's metrics interval, the process's GPUs) are read here too, once, into ``EnvSwitches``; the
CLI builds the same objects (``pdperf serve``).

``load_specs`` reads the topology and workload folders the options name (``--topologies-dir``,
``--workloads-dir``; the repo's own by default) and checks the ``--topology``/``--workload``
patterns against them: that needs the files, so it is the one step here that does I/O.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pdperf.backends.factory import BackendOptions
from pdperf.backends.ray_serve import METRICS_REPORT_INTERVAL_MS
from pdperf.engine import parse_engine_args, with_engine_overrides
from pdperf.errors import SpecError
from pdperf.models import DEFAULT_CACHE, cache_dir
from pdperf.specs import TOPOLOGY_DIR, WORKLOAD_DIR, Topology, Workload, all_topologies, all_workloads

Backend = Literal["ray", "vllm", "external"]
Device = Literal["auto", "cpu", "gpu"]


@dataclass(frozen=True)
class EnvSwitches:
    """The suite's switches that come from the environment, read once where the process starts."""

    wrap_ray_servers: bool = True  # PDPERF_WRAP_RAY_SERVERS=0: Ray's own server classes (per-role port base only)
    git_sha: str | None = None  # PDPERF_GIT_SHA: the commit a copy of the tree without its .git measures
    model_cache: Path = DEFAULT_CACHE  # PDPERF_MODEL_CACHE: where model folders are built
    metrics_report_interval_ms: int = METRICS_REPORT_INTERVAL_MS  # RAY_metrics_report_interval_ms, local heads
    cuda_visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES: the GPUs the vllm backend may hand out

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> EnvSwitches:
        raw_interval = environ.get("RAY_metrics_report_interval_ms") or ""
        try:
            interval = int(raw_interval) if raw_interval.strip() else METRICS_REPORT_INTERVAL_MS
        except ValueError:
            raise SpecError(f"RAY_metrics_report_interval_ms={raw_interval!r}: expected whole milliseconds, e.g. "
                            f"1000; unset it for the suite's {METRICS_REPORT_INTERVAL_MS}") from None
        return cls(wrap_ray_servers=environ.get("PDPERF_WRAP_RAY_SERVERS", "1") != "0",
                   git_sha=(environ.get("PDPERF_GIT_SHA") or "").strip() or None,
                   model_cache=cache_dir(environ),
                   metrics_report_interval_ms=interval,
                   cuda_visible_devices=environ.get("CUDA_VISIBLE_DEVICES"))


@dataclass(frozen=True)
class SessionOptions:
    """Everything a session was asked to do. Built by ``from_namespace`` (pytest) or by keywords (CLI);
    checked on construction, so an instance is always a valid set of options."""

    backend: Backend = "ray"
    device: Device = "auto"  # as asked; the planner resolves "auto" from the cluster's nodes
    topology_patterns: tuple[str, ...] = ()
    workload_patterns: tuple[str, ...] = ()
    topologies_dir: Path = TOPOLOGY_DIR
    workloads_dir: Path = WORKLOAD_DIR
    ray_address: str | None = None
    model_override: str | None = None  # --model: served by GPU topologies instead of their file's
    external_url: str | None = None
    external_model: str | None = None
    tokenizer: str | None = None
    deploy_timeout_s: float = 900.0
    max_alive: int = 2
    requests_scale: float = 1.0
    stream_batching_ms: int = 0
    inject_slowdown: float | None = None  # --inject-slowdown: every response this much slower (pdperf.inject)
    engine_overrides: dict[str, Any] = field(default_factory=dict)  # --engine-arg, parsed
    keep_deployments: bool = False
    prestart: bool = True
    xdist_workers: int | str | None = None  # pytest-xdist's -n
    env: EnvSwitches = field(default_factory=EnvSwitches)

    def __post_init__(self) -> None:
        for name, value, allowed in (("--backend", self.backend, get_args(Backend)),
                                     ("--device", self.device, get_args(Device))):
            if value not in allowed:
                raise SpecError(f"{name} {value}: expected one of {', '.join(allowed)}")
        if self.xdist_workers and self.backend == "ray" and not self.ray_address:
            raise SpecError(f"-n {self.xdist_workers}: pytest-xdist workers would each start their own local Ray "
                            "head; start one (`ray start --head`) and pass --ray-address auto, with --dist loadgroup")
        if self.keep_deployments and not self.ray_address:
            raise SpecError("--keep-deployments needs --ray-address: a local Ray head ends with the session")
        if self.backend == "external" and not self.external_url:
            raise SpecError("--backend external needs --external-url URL (the server's base URL)")
        if self.requests_scale <= 0:
            raise SpecError(f"--requests-scale {self.requests_scale}: must be > 0 (e.g. 0.2 for a quick look; "
                            "baselines need 1.0)")
        if self.max_alive < 1:
            raise SpecError(f"--max-alive {self.max_alive}: must be >= 1 (how many deployments stay up at once)")
        if self.deploy_timeout_s <= 0:
            raise SpecError(f"--deploy-timeout {self.deploy_timeout_s:g}: must be > 0 seconds, e.g. 900")
        if self.stream_batching_ms < 0:
            raise SpecError(f"--stream-batching-ms {self.stream_batching_ms}: must be >= 0 (0 = off, Ray's own "
                            "default is 50)")
        if self.inject_slowdown is not None and not 0 <= self.inject_slowdown <= 10:
            raise SpecError(f"--inject-slowdown {self.inject_slowdown:g}: must be between 0 and 10 (0.2 = every "
                            "response 20% slower; 0 = through the proxy, unslowed)")

    @classmethod
    def from_namespace(cls, ns: Any, *, root: Path, environ: Mapping[str, str]) -> SessionOptions:
        """From pytest's option namespace (fixtures/options.py defines every name read here); ``root``
        holds the default topologies/ and workloads/; ``environ`` is the process's environment."""
        return cls(
            backend=ns.backend, device=ns.device,
            topology_patterns=tuple(ns.topology or ()), workload_patterns=tuple(ns.workload or ()),
            topologies_dir=Path(ns.topologies_dir) if ns.topologies_dir else root / "topologies",
            workloads_dir=Path(ns.workloads_dir) if ns.workloads_dir else root / "workloads",
            ray_address=ns.ray_address, model_override=ns.model, external_url=ns.external_url,
            external_model=ns.external_model, tokenizer=ns.tokenizer, deploy_timeout_s=ns.deploy_timeout,
            max_alive=ns.max_alive, requests_scale=ns.requests_scale, stream_batching_ms=ns.stream_batching_ms,
            inject_slowdown=getattr(ns, "inject_slowdown", None),
            engine_overrides=parse_engine_args(ns.engine_arg or []), keep_deployments=ns.keep_deployments,
            prestart=not ns.no_prestart,
            xdist_workers=getattr(ns, "numprocesses", None),  # only there with pytest-xdist installed
            env=EnvSwitches.from_environ(environ))

    def backend_options(self) -> BackendOptions:
        """What the backend factory needs of these options."""
        return BackendOptions(name=self.backend, model_override=self.model_override,
                              stream_batching_ms=self.stream_batching_ms, keep_deployments=self.keep_deployments,
                              wrap_ray_servers=self.env.wrap_ray_servers, model_cache=self.env.model_cache,
                              external_url=self.external_url, external_model=self.external_model,
                              tokenizer=self.tokenizer)


@dataclass(frozen=True)
class SpecSet:
    """The topologies and workloads a session knows, by name (``--engine-arg`` laid over every topology)."""

    topologies: Mapping[str, Topology]
    workloads: Mapping[str, Workload]


def load_specs(options: SessionOptions) -> SpecSet:
    """The topology and workload files of the options' folders, validated, and the ``--topology`` /
    ``--workload`` patterns checked against them (a pattern that matches nothing is a typo)."""
    topologies = _load_folder(options.topologies_dir, "--topologies-dir", "topology", all_topologies,
                              TOPOLOGY_DIR)
    workloads = _load_folder(options.workloads_dir, "--workloads-dir", "workload", all_workloads, WORKLOAD_DIR)
    topologies = {n: with_engine_overrides(t, options.engine_overrides) for n, t in topologies.items()}
    where_t = _folder_label(options.topologies_dir, TOPOLOGY_DIR)
    unknown = [p for p in options.topology_patterns if not any(fnmatch.fnmatchcase(n, p) for n in topologies)]
    if unknown and options.backend != "external":  # external: a pattern names the stand-in's shape, if any
        raise SpecError(f"--topology {', '.join(unknown)}: no such topology in {where_t}; known: "
                        f"{', '.join(sorted(topologies))}")
    where_w = _folder_label(options.workloads_dir, WORKLOAD_DIR)
    unknown_wl = [p for p in options.workload_patterns if not any(fnmatch.fnmatchcase(n, p) for n in workloads)]
    if unknown_wl:
        raise SpecError(f"--workload {', '.join(unknown_wl)}: no such workload in {where_w}; known: "
                        f"{', '.join(sorted(workloads))}")
    return SpecSet(topologies=topologies, workloads=workloads)


def _folder_label(folder: Path, repo_default: Path) -> str:
    """How messages name a spec folder: ``topologies/`` for the repo's own, else the path given."""
    return f"{repo_default.name}/" if _same_path(folder, repo_default) else str(folder)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _load_folder(folder: Path, option: str, what: str, load: Callable[[Path], dict[str, Any]],
                 repo_default: Path) -> dict[str, Any]:
    fix = f"pass a folder of {what} YAML files, or leave {option} out for the repo's {repo_default.name}/"
    if not folder.exists():
        raise SpecError(f"{option} {folder}: no such folder; {fix}")
    if not folder.is_dir():
        raise SpecError(f"{option} {folder}: not a folder; {fix}")
    if not any(folder.glob("*.yaml")):
        raise SpecError(f"{option} {folder}: no {what} files (*.yaml) in it; {fix}")
    return load(folder)  # a file that fails validation: SpecError naming the file, the key and the fix
