"""Ray Serve LLM backend: a Topology becomes a Serve application on a Ray cluster.

Collocated topologies go through ``build_openai_app``, PD ones through
``build_pd_openai_app`` (ingress -> decode server -> prefill server, KV over NIXL). Each
topology is its own Serve application under its own route prefix, so several can be up at
once on one cluster. Settings the reference study learned the hard way are always applied:
stream batching off (``stream_batching_interval_ms: 0``, the 50 ms default inflates TTFT and
chunk gaps), ingress replicas explicit, prefill/decode pre-warm where the Ray version has it.

Readiness is polled under a deadline (Serve application status, then ``/v1/models``); a
failed deployment ends at once with Serve's message and the replicas' last log lines, not
after the timeout. Replica restarts are counted from Ray's actor table (a dead
``ServeReplica:<app>:*`` actor is a replica that was replaced).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pdperf import compat
from pdperf.backends import ray_replica
from pdperf.backends.base import Deployment, Endpoint, ray_worker_log, tail_file
from pdperf.cluster import NodeInfo, nodes_from_ray
from pdperf.engine import engine_env, engine_kwargs
from pdperf.errors import ClusterError, DeployError
from pdperf.models import DEFAULT_CACHE, ensure_model
from pdperf.placement import PlacementPlan, plan
from pdperf.specs import Topology
from pdperf.waiting import WaitTimeout, free_port, poll_until

log = logging.getLogger(__name__)
PROGRESS = logging.getLogger("pdperf.progress")  # shown on the terminal during long waits (fixtures/session.py)

# vLLM 0.26's Ray executor (RayExecutorV2) puts an engine's torch.distributed TCPStore on the
# first free port from VLLM_DP_MASTER_PORT + 100 (default 0, so port 100) on every engine of a
# node: engines that start together all pick the same port and all but one die with
# `DistNetworkError … EADDRINUSE` (seen on 4x H100: a PD prefill failed three times in a row and
# Serve gave its application up; two replicas of one role raced and one restarted). Each replica
# picks a free port of its own when it starts (pdperf/backends/ray_replica.py); each role's
# runtime_env also carries a base of its own (far from Ray's ports 6379, 8265, 10002-19999,
# Serve's 8000 and NIXL's 20000/22000), which is what remains where Ray's server classes cannot
# be wrapped.
TCPSTORE_BASES = range(23000, 32000, 160)
# How often Ray exports metrics (vLLM's reach /metrics only through it): Ray's default, 10 s, left
# a point's after-scrape short of its last seconds (CPU: the engines counted 49 of 60 measured
# requests; 60 of 60 at 1 s). Heads the suite starts use 1 s (or RAY_metrics_report_interval_ms
# from the environment, which the session's options read); a cluster's own heads need
# RAY_metrics_report_interval_ms=1000 in every node's environment before `ray start`.
METRICS_REPORT_INTERVAL_MS = 1000


def _check_gcs_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds where no GCS listens: ray.init retries such an address for ~15 minutes.

    Probes the host:port Ray itself would dial (it swaps 127.0.0.1/localhost for the node IP);
    ``ray://`` client addresses and addresses Ray cannot resolve are left to ray.init.
    """
    if "://" in address:
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:
        target = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError):
        return  # ray.init raises these itself, with its own message
    if target is None:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"nothing answers at {target}: {e.strerror or e}") from None


class RayCluster:
    """A Ray cluster with Serve running: a local head on loopback, or an existing cluster."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 metrics_report_interval_ms: int = METRICS_REPORT_INTERVAL_MS):
        self.address = address
        self.num_cpus = num_cpus
        self.metrics_report_interval_ms = metrics_report_interval_ms  # a local head's; a cluster keeps its own
        self.local = address is None
        self.http_port: int | None = None
        self.http_host = "127.0.0.1"
        self.metrics_port: int | None = None
        self._nodes: list[NodeInfo] | None = None
        self._preexisting_engines: set[int] = set()

    def start(self) -> RayCluster:
        import ray
        from ray import serve

        if self.local:
            self._preexisting_engines = _engine_pids()
            self.metrics_port = free_port()
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     num_cpus=self.num_cpus or max(8, os.cpu_count() or 1), log_to_driver=False,
                     _metrics_export_port=self.metrics_port, configure_logging=False,
                     _system_config={"metrics_report_interval_ms": self.metrics_report_interval_ms})
            self.http_port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        else:
            try:
                _check_gcs_reachable(str(self.address))
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ClusterError(
                    f"--ray-address {self.address}: cannot connect to a Ray cluster there ({first}); "
                    "check the address (`ray status` on the head prints it), or omit --ray-address to start a "
                    "local head") from None
            head = next((n for n in self.nodes() if n.is_head), None)
            self.http_host = head.ip if head else "127.0.0.1"
            serve.start(http_options={"host": "0.0.0.0"})
            self.http_port = compat.serve_http_port()
        return self

    def _reap_engines(self, timeout_s: float = 30.0) -> list[int]:
        """vLLM engine processes this session started that outlive Ray's shutdown: wait, then kill."""
        import psutil

        ours = lambda: _engine_pids() - self._preexisting_engines  # noqa: E731
        try:
            poll_until(lambda: True if not ours() else None, what="vLLM engine processes to exit", timeout_s=timeout_s)
            return []
        except WaitTimeout:
            left = sorted(ours())
            for pid in left:
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            return left

    def nodes(self, refresh: bool = False) -> list[NodeInfo]:
        if self._nodes is None or refresh:
            self._nodes = nodes_from_ray()
        return self._nodes

    def metrics_urls(self) -> list[str]:
        import ray

        urls = []
        for n in ray.nodes():
            if n.get("Alive") and n.get("MetricsExportPort"):
                host = "127.0.0.1" if self.local else n["NodeManagerAddress"]  # a local head: stay on loopback
                urls.append(f"http://{host}:{n['MetricsExportPort']}/metrics")
        return urls

    @property
    def http_base(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        if self.local:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
            leftovers = self._reap_engines()
            if leftovers:
                raise DeployError(f"teardown: {len(leftovers)} vLLM engine process(es) outlived the local Ray head "
                                  f"and were killed: {leftovers}")
        else:
            ray.shutdown()  # the cluster and its other applications are someone else's


def _engine_pids() -> set[int]:
    """PIDs of vLLM engine processes on this machine (they name themselves VLLM::EngineCore / VLLM::Worker)."""
    import psutil

    out = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = p.info.get("cmdline") or []
            if (p.info.get("name") or "").startswith("VLLM::") or (cmd and cmd[0].startswith("VLLM::")):
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


def llm_config(t: Topology, role: str, model_path: Path, placement: PlacementPlan, local: bool,
               *, stream_batching_interval_ms: int = 0, tcpstore_base: int | None = None) -> dict[str, Any]:
    """The LLMConfig (as a dict) for one role of a topology: the engine's arguments and environment
    from pdperf.engine (as the vllm backend's), with Ray's replica count, placement and start-up settings."""
    r = t.roles()[role]
    env = engine_env(t, local)
    if t.device == "gpu" and tcpstore_base is not None and "VLLM_DP_MASTER_PORT" not in env:
        # the topology's own VLLM_DP_MASTER_PORT wins over both
        env = {"VLLM_DP_MASTER_PORT": str(tcpstore_base), ray_replica.MARK: ray_replica.MARK_VALUE, **env}
    if t.device == "gpu" and r.gpu_fraction < 1 and "VLLM_RAY_PER_WORKER_GPUS" not in env:
        # vLLM's Ray worker asks for a whole GPU unless told; its bundle holds only the fraction
        # (newer Ray Serve LLM infers it from the bundle, older ones do not: ray-project/ray#58328)
        env = {**env, "VLLM_RAY_PER_WORKER_GPUS": str(r.gpu_fraction)}
    experimental: dict[str, Any] = {"stream_batching_interval_ms": stream_batching_interval_ms}
    if t.kind == "pd":
        experimental["_prewarm_prefill_decode"] = True
    return {
        "model_loading_config": {"model_id": t.name, "model_source": str(model_path)},
        "engine_kwargs": engine_kwargs(t, role, model_path),
        "deployment_config": {"num_replicas": r.replicas},
        "placement_group_config": placement.roles[role].placement_group_config,
        "experimental_configs": experimental,
        "runtime_env": {"env_vars": env},
        "log_engine_metrics": True,
    }


def build_app(t: Topology, model_path: Path, placement: PlacementPlan, local: bool,
              *, stream_batching_interval_ms: int = 0, wrap_servers: bool = True):
    """The Serve application of ``t``. ``wrap_servers=False`` (PDPERF_WRAP_RAY_SERVERS=0, read by the
    session's options) deploys Ray's own server classes, with the per-role port base only: the way
    out should a Ray version reject the wrapped ones."""
    from ray.serve.llm import build_openai_app, build_pd_openai_app

    ingress = {"num_replicas": t.ingress_replicas}
    kw = {"stream_batching_interval_ms": stream_batching_interval_ms}
    bases = random.SystemRandom().sample(TCPSTORE_BASES, 2)  # a different one per role
    # The server classes, wrapped to pick a port per replica, travel by value: a Ray worker on
    # another node need not import pdperf.
    if wrap_servers:
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(ray_replica)
    if t.kind == "collocated":
        cfg = llm_config(t, "collocated", model_path, placement, local, **kw, tcpstore_base=bases[0])
        if wrap_servers:
            cfg["server_cls"] = ray_replica.own_port(compat.llm_server_cls())
        return build_openai_app({"llm_configs": [cfg], "ingress_deployment_config": ingress})
    compat.register_ray_kv_backend(t.kv_connector)
    pd_args = {
        "prefill_config": llm_config(t, "prefill", model_path, placement, local, **kw, tcpstore_base=bases[0]),
        "decode_config": llm_config(t, "decode", model_path, placement, local, **kw, tcpstore_base=bases[1]),
        "ingress_deployment_config": ingress,
    }
    if not wrap_servers:
        return build_pd_openai_app(pd_args)
    with compat.pd_server_classes(ray_replica.own_port) as wrapped:
        if not wrapped:
            log.warning("topology %s: this Ray's PD builder is not the one pdperf knows; replicas of one role "
                        "share a torch.distributed port base and may restart once at start-up", t.name)
        return build_pd_openai_app(pd_args)


def delete_app(app: str, *, timeout_s: float = 120.0) -> None:
    """Delete a Serve application on the connected cluster and wait until its replicas and placement
    groups are released."""
    from ray import serve

    serve.delete(app, _blocking=True)

    def gone() -> bool | None:
        alive = [a for a in _replica_actors(app) if a.get("State") != "DEAD"]
        pgs = [p for p in compat.placement_groups()
               if p.get("state") != "REMOVED" and f"{app}#" in (p.get("name") or "")]
        return True if not alive and not pgs else None

    poll_until(gone, what=f"replicas and placement groups of '{app}' to be released", timeout_s=timeout_s)


def _replica_actors(app: str) -> list[dict[str, Any]]:
    prefix = f"ServeReplica:{app}:"
    return [a for a in compat.actor_table() if (a.get("ActorClassName") or "").startswith(prefix)]


def _actor_log_tail(actor: dict[str, Any], n: int, suffix: str = "err") -> str:
    """Last lines of a replica's stderr (vLLM logs there; ``suffix="out"``: its stdout, where UCX
    prints): local log files, else the state API (a replica on another node)."""
    pid = actor.get("Pid")
    if not pid:  # PENDING_CREATION: never scheduled (no resources), so no process and no log
        return f"(no log: the replica has no process yet, state {actor.get('State')})"
    logs_dir = compat.local_logs_dir()
    log_file = ray_worker_log(Path(logs_dir), pid, suffix) if logs_dir else None
    if log_file is not None:
        return tail_file(log_file, n)
    try:
        from ray.util.state import get_log

        return "".join(get_log(pid=pid, node_id=actor["Address"]["NodeID"], tail=n, suffix=suffix, timeout=10))
    except Exception as e:  # noqa: BLE001 - a missing log must not hide the real failure
        return f"(log unavailable: {type(e).__name__}: {e})"


def _short_message(message: str | None, limit: int = 160) -> str:
    """Serve's deployment message as one short line: its first sentence, without the
    "Deployment 'X' in application 'Y'" preamble the status line already carries."""
    if not message:
        return ""
    text = " ".join(message.split())
    text = re.sub(r"^Deployment '[^']*' in application '[^']*' ", "", text)
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _pending_note(pending: list[dict[str, Any]], others: list[str]) -> str:
    """What a start-up waits for when its placement groups are not placed, and which other Serve
    applications hold resources now (a run kept with --keep-deployments, another session's)."""
    bundles = list((pending[0].get("bundles") or {}).values())
    note = (f"{len(pending)} placement group(s) not yet placed, e.g. bundles {bundles} "
            f"({pending[0].get('strategy', '')}): the cluster lacks these resources now")
    if others:
        note += (f", while other Serve applications hold theirs: {', '.join(others)} (left by "
                 f"--keep-deployments or another run? `serve delete NAME` frees them)")
    return note


class RayServeDeployment(Deployment):
    backend = "ray"

    def __init__(self, topology: Topology, cluster: RayCluster, *, model: str | None = None,
                 stream_batching_interval_ms: int = 0, app_suffix: str = "", keep: bool = False,
                 wrap_servers: bool = True, model_cache: Path = DEFAULT_CACHE):
        self.topology = topology
        self.keep = keep
        self.cluster = cluster
        self.model = model or topology.model
        self.model_cache = model_cache
        self.wrap_servers = wrap_servers
        self.stream_batching_interval_ms = stream_batching_interval_ms
        self.app = topology.name + app_suffix
        self._started = False
        self._earlier_actors: set[str | None] = set()  # dead replicas of an earlier app of this name

    # -- observation ---------------------------------------------------------------------------
    def restarts(self) -> int:
        """Replicas replaced (dead replica actors) plus in-place actor restarts, of this deployment only:
        an earlier application of the same name (a previous run on this cluster) leaves its dead actors
        in the actor table, and they are no restart of this one."""
        actors = [a for a in _replica_actors(self.app) if a.get("ActorID") not in self._earlier_actors]
        return sum(1 for a in actors if a.get("State") == "DEAD") + sum(int(a.get("NumRestarts") or 0) for a in actors)

    def neighbours(self) -> list[str]:
        """Other Serve applications on this cluster (kept by another run too), not being deleted."""
        from ray import serve

        try:
            apps = serve.status().applications
        except Exception as e:  # noqa: BLE001 - a point is still measured; the record says it is unknown
            log.warning("topology %s: could not list Serve applications: %s", self.topology.name, e)
            return ["(unknown)"]
        return self._others(apps)

    def _others(self, apps: dict[str, Any]) -> list[str]:
        return sorted(n for n, a in apps.items() if n != self.app and not str(a.status).endswith("DELETING"))

    def log_tail(self, n: int = 40) -> str:
        chunks = []
        for a in _replica_actors(self.app):
            if "Ingress" in a.get("ActorClassName", ""):
                continue
            lines = [ln for ln in _actor_log_tail(a, n).splitlines() if ln.strip()][-n:]
            chunks.append(f"--- {a['ActorClassName']} ({a.get('State')}, pid {a.get('Pid')}) last {len(lines)} lines:\n"
                          + "\n".join(lines))
        return "\n".join(chunks) or "(no replica logs found)"

    def engine_output(self, n: int = 4000) -> str:
        """Every engine replica's newest ``n`` lines of stdout and stderr (the engine core is a child
        of the replica's process and writes to the same files)."""
        return "\n".join(_actor_log_tail(a, n, suffix) for a in _replica_actors(self.app)
                         if "Ingress" not in a.get("ActorClassName", "") for suffix in ("out", "err"))

    def _status_text(self) -> str:
        from ray import serve

        apps = serve.status().applications
        st = apps.get(self.app)
        if st is None:
            return "application not yet known to Serve"
        parts = [f"app {st.status.value}" + (f" ({st.message})" if st.message else "")]
        for name, d in st.deployments.items():
            msg = _short_message(d.message)
            parts.append(f"{name}: {d.status.value} replicas {dict(d.replica_states)}" + (f" {msg}" if msg else ""))
        try:
            pending = [p for p in compat.placement_groups()
                       if p.get("state") in ("PENDING", "RESCHEDULING") and f"{self.app}#" in (p.get("name") or "")]
        except Exception:  # noqa: BLE001 - a status line must not fail the wait it describes
            pending = []
        if pending:
            parts.append(_pending_note(pending, self._others(apps)))
        return "; ".join(parts)

    # -- lifecycle -----------------------------------------------------------------------------
    def launch(self) -> None:
        from ray import serve

        t = self.topology
        self._placement = plan(t, self.cluster.nodes())
        if not self._placement.feasible:
            raise ClusterError(self._placement.reason or "")
        self._model_path = ensure_model(self.model, cache=self.model_cache)
        self._t0 = time.monotonic()
        self._adopted = False
        self._earlier_actors = {a.get("ActorID") for a in _replica_actors(self.app) if a.get("State") == "DEAD"}
        st = serve.status().applications.get(self.app) if not self.cluster.local else None
        if st is not None and not self.keep:
            # serve.run would silently replace it: another session's deployment (or a crashed run's).
            raise DeployError(
                f"topology {t.name}: a Serve application '{self.app}' already exists on this cluster "
                f"({st.status.value}): another pytest session or worker is using it, or a crashed run left it. "
                f"Pass --keep-deployments to adopt it, or delete it (`serve delete {self.app}`) and rerun")
        if self.keep and st is not None and st.status.value in ("RUNNING", "DEPLOYING"):
            # A kept application (still starting, or serving): wait for it instead of redeploying,
            # which would start a second set of engines beside the first.
            log.warning("topology %s: adopting the %s Serve application '%s' (--keep-deployments); "
                        "drop that option to redeploy it", t.name, st.status.value, self.app)
            self._adopted = True
            return
        app = build_app(t, self._model_path, self._placement, self.cluster.local,
                        stream_batching_interval_ms=self.stream_batching_interval_ms, wrap_servers=self.wrap_servers)
        self._started = True
        try:
            compat.serve_run_nowait(app, name=self.app, route_prefix=f"/{self.app}")
        except RuntimeError as e:  # Serve refused or failed the application outright
            raise DeployError(f"topology {t.name}: Serve could not deploy it: {e}\n{self.log_tail()}") from None

    def wait_ready(self, timeout_s: float = 900.0) -> Endpoint:
        from ray import serve

        t = self.topology
        base = f"{self.cluster.http_base}/{self.app}"
        t0 = self._t0

        def app_running() -> bool | None:
            st = serve.status().applications.get(self.app)
            if st is None:
                return None
            if st.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"topology {t.name}: Serve reports {self._status_text()}\n{self.log_tail()}")
            return True if st.status.value == "RUNNING" else None

        last_answer = ["no answer yet"]

        def models_answer() -> bool | None:
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as resp:
                    ids = [m["id"] for m in json.load(resp).get("data", [])]
                    last_answer[0] = f"lists {ids}"
                    return True if t.name in ids else None
            except (urllib.error.URLError, OSError, ValueError) as e:
                last_answer[0] = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
                return None

        def progress(line: str) -> None:
            PROGRESS.info("topology %s: %s", t.name, line)

        try:
            poll_until(app_running, what=f"Serve application '{self.app}' to be RUNNING", timeout_s=timeout_s,
                       interval_s=1.0, describe=self._status_text, progress=progress)
            remaining = max(30.0, timeout_s - (time.monotonic() - t0))
            poll_until(models_answer, what=f"{base}/v1/models to list '{t.name}'", timeout_s=remaining,
                       describe=lambda: last_answer[0], progress=progress)
        except WaitTimeout as e:
            raise DeployError(f"topology {t.name}: {e}\n{self.log_tail()}") from None
        startup_s = 0.0 if self._adopted else time.monotonic() - t0
        PROGRESS.info("topology %s: ready after %.0f s%s", t.name, time.monotonic() - t0,
                      " (adopted a kept application)" if self._adopted else "")
        restarts = self.restarts()
        if restarts:
            log.warning("topology %s: %d replica restart(s) during start-up", t.name, restarts)
        return Endpoint(
            topology=t, backend=self.backend, base_url=base, model_id=t.name, tokenizer_path=self._model_path,
            model=self.model,
            metrics_urls=self.cluster.metrics_urls(), startup_s=startup_s, placement=self._placement,
            restarts_at_ready=restarts, restart_counter=self.restarts, log_tail=self.log_tail,
            engine_output=self.engine_output,
            neighbours=self.neighbours,
            details={"app": self.app, "ray_address": self.cluster.address or "local", "adopted": self._adopted,
                     "stream_batching_interval_ms": self.stream_batching_interval_ms})

    def stop(self, timeout_s: float = 120.0, *, evict: bool = False) -> None:
        """Delete the application and check that its replicas and placement groups are gone."""
        if self.keep and not evict:
            log.warning("topology %s: left running (--keep-deployments)", self.topology.name)
            return
        if not self._started and not getattr(self, "_adopted", False):
            return
        delete_app(self.app, timeout_s=timeout_s)
        self._started = False
