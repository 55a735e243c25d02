"""What a run leaves behind, and how to remove what a killed run left.

A session that ends (pass, fail, fault, Ctrl-C) must leave the machine as it found it: a vLLM
engine that outlives its session holds cores (and on GPU nodes its memory) and is measured as
part of the next run's latency; a Serve application left on a kept cluster holds its GPUs. So
the suite takes a ``Snapshot`` when the session starts and another after its deployments are torn
down, and ``diff`` names what is new: engine processes (``VLLM::EngineCore``, ``VLLM::Worker*``),
``vllm serve`` processes, Ray processes and pdperf's own helpers (with their listening ports),
GPU memory held by new processes, and, on a cluster given with --ray-address, Serve
applications, actors and placement groups. What existed before the run (an external cluster's
own applications) is not a leak, and the applications --keep-deployments keeps are expected.

A pytest process killed with SIGKILL runs no teardown at all: its local Ray head dies with it
(Ray fate-shares a head it starts with its driver), but the engine processes under the head's
replicas are re-parented to init and keep running. ``orphans`` finds them (a vLLM, Ray worker or
pdperf process whose parent is init is no longer part of any live session); ``pdperf cleanup``
removes them, and with --ray-address also deletes the Serve applications of the suite's
topologies on a kept cluster.

Everything here is plain data and functions over it; ``fixtures/leaks.py`` wires the check into
pytest and ``pdperf cleanup`` (pdperf.cli) calls the rest.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pdperf.waiting import WaitTimeout, poll_until

ProcessKind = Literal["engine", "vllm serve", "ray", "pdperf"]

#: how long teardown's engine processes get to exit before the check calls them leftovers: an
#: engine core killed with its replica is reaped by init a moment later, not at once
EXIT_GRACE_S = 30.0

#: Ray and Serve's own actors: a cluster's machinery (started by Serve when first used), not a run's
SYSTEM_ACTOR_CLASSES = frozenset({"ServeController", "ProxyActor", "HTTPProxyActor", "gRPCProxyActor",
                                  "_StatsActor", "StatsActor", "JobSupervisor", "_RayInternalKVActor"})
SERVE_REPLICA_PREFIX = "ServeReplica:"

LEFTOVERS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    create_time: float  # with the pid, who a process is (pids are reused)
    kind: ProcessKind
    command: str  # its command line, shortened
    ppid: int
    descendant: bool = False  # a descendant of the process that took the snapshot
    ports: tuple[int, ...] = ()  # TCP ports it listens on (filled for leftovers only)

    @property
    def key(self) -> tuple[int, float]:
        return self.pid, self.create_time

    def describe(self) -> str:
        ports = f", listening on {', '.join(map(str, self.ports))}" if self.ports else ""
        return f"pid {self.pid} ({self.command}{ports})"


@dataclass(frozen=True)
class GpuApp:
    pid: int
    name: str
    used_mib: int | None


@dataclass(frozen=True)
class ActorInfo:
    actor_id: str
    class_name: str
    pid: int | None
    job_id: str | None
    detached: bool = False


@dataclass(frozen=True)
class PlacementGroupInfo:
    pg_id: str
    name: str
    state: str


@dataclass(frozen=True)
class ClusterState:
    """What a Ray cluster holds: Serve applications, live actors, placement groups not removed."""

    serve_apps: tuple[str, ...] = ()
    actors: tuple[ActorInfo, ...] = ()
    placement_groups: tuple[PlacementGroupInfo, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    processes: tuple[ProcessInfo, ...]
    gpu_apps: tuple[GpuApp, ...] | None  # None: not looked at (``gpu_note`` says why)
    gpu_note: str | None = None
    cluster: ClusterState | None = None  # None: no cluster connected at that moment


@dataclass(frozen=True)
class Leftovers:
    """What a run left behind; empty when it left nothing."""

    processes: tuple[ProcessInfo, ...] = ()
    gpu_apps: tuple[GpuApp, ...] = ()
    serve_apps: tuple[str, ...] = ()
    actors: tuple[ActorInfo, ...] = ()
    placement_groups: tuple[PlacementGroupInfo, ...] = ()
    expected: tuple[str, ...] = ()  # left on purpose (--keep-deployments): said, not failed
    not_checked: tuple[str, ...] = ()  # what this check could not look at, and why

    @property
    def empty(self) -> bool:
        return not (self.processes or self.gpu_apps or self.serve_apps or self.actors or self.placement_groups)

    def summary(self) -> str:
        """One line: each kind of leftover with its count and names (``2 engine processes (pids 1, 2:
        VLLM::EngineCore), Serve app 'x'``)."""
        parts = []
        by_kind: dict[str, list[ProcessInfo]] = {}
        for p in self.processes:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, procs in by_kind.items():
            commands = sorted({os.path.basename(p.command.split()[0]) if p.kind in ("engine", "ray") else p.command
                               for p in procs})
            parts.append(f"{_count(len(procs), kind + ' process')} (pid{'s' if len(procs) > 1 else ''} "
                         f"{', '.join(str(p.pid) for p in procs)}: {', '.join(commands)})")
        if self.gpu_apps:
            mib = sum(a.used_mib or 0 for a in self.gpu_apps)
            parts.append(f"GPU memory held by {_count(len(self.gpu_apps), 'process')} "
                         f"(pids {', '.join(str(a.pid) for a in self.gpu_apps)}: {mib} MiB)")
        if self.serve_apps:
            parts.append(f"Serve app{'s' if len(self.serve_apps) > 1 else ''} "
                         + ", ".join(f"'{a}'" for a in self.serve_apps))
        if self.actors:
            parts.append(f"{_count(len(self.actors), 'Ray actor')} "
                         f"({', '.join(sorted({a.class_name for a in self.actors}))})")
        if self.placement_groups:
            parts.append(f"{_count(len(self.placement_groups), 'placement group')} "
                         f"({', '.join(p.name or p.pg_id for p in self.placement_groups)})")
        return ", ".join(parts)

    def message(self, *, cleanup_hint: str = "`pdperf cleanup` removes them") -> str:
        """The failure: the one line first, then one line per leftover."""
        lines = [f"leftovers after the run: {self.summary()}; {cleanup_hint}"]
        lines += [f"  {p.kind} process {p.describe()}" for p in self.processes]
        lines += [f"  GPU process pid {a.pid} ({a.name}): {a.used_mib} MiB" for a in self.gpu_apps]
        lines += [f"  Serve application '{a}'" for a in self.serve_apps]
        lines += [f"  actor {a.class_name} ({a.actor_id}, pid {a.pid})" for a in self.actors]
        lines += [f"  placement group {p.name or '(unnamed)'} ({p.pg_id}, {p.state})" for p in self.placement_groups]
        lines += [f"  expected: {e}" for e in self.expected]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": LEFTOVERS_SCHEMA_VERSION, "clean": self.empty,
                "summary": self.summary() if not self.empty else "", **asdict(self)}


def _count(n: int, noun: str) -> str:
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith("ss") else f"{n} {noun}s"


# -- processes ---------------------------------------------------------------------------------------
def classify(name: str, cmdline: list[str]) -> ProcessKind | None:
    """Which of the suite's kinds of process this is, from its name and command line; None for others."""
    first = cmdline[0] if cmdline else ""
    if name.startswith("VLLM::") or first.startswith("VLLM::"):
        return "engine"
    base = [os.path.basename(a) for a in cmdline]
    if any(b == "vllm" and nxt == "serve" for b, nxt in zip(base, base[1:], strict=False)) \
            or any(a.startswith("vllm.entrypoints") for a in cmdline):
        return "vllm serve"
    if first.startswith("ray::") or os.path.basename(first) in ("raylet", "gcs_server") \
            or any("/site-packages/ray/" in a for a in cmdline[:3]):
        return "ray"
    if any(a == "-m" and nxt.startswith("pdperf.") for a, nxt in zip(cmdline, cmdline[1:], strict=False)):
        return "pdperf"  # the no-Ray PD proxy, --inject-slowdown's proxy
    return None


def _short(cmdline: list[str], name: str, limit: int = 120) -> str:
    text = " ".join(" ".join(cmdline).split()) or name  # a retitled process (setproctitle) pads its arguments
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_processes(own_pid: int | None = None) -> tuple[ProcessInfo, ...]:
    """The suite's kinds of process on this machine (zombies left out: they hold nothing but a pid),
    each marked when it descends from ``own_pid``."""
    import psutil

    descendants: set[int] = set()
    if own_pid is not None:
        try:
            descendants = {c.pid for c in psutil.Process(own_pid).children(recursive=True)}
        except psutil.Error:
            pass
    out = []
    for p in psutil.process_iter(["name", "cmdline", "ppid", "create_time", "status"]):
        try:
            info = p.info
            if info.get("status") == psutil.STATUS_ZOMBIE or p.pid == own_pid:
                continue
            cmd = info.get("cmdline") or []
            kind = classify(info.get("name") or "", cmd)
            if kind is None:
                continue
            out.append(ProcessInfo(p.pid, float(info.get("create_time") or 0.0), kind,
                                   _short(cmd, info.get("name") or ""), int(info.get("ppid") or 0),
                                   descendant=p.pid in descendants))
        except psutil.Error:
            continue
    return tuple(out)


def with_ports(processes: Iterable[ProcessInfo]) -> tuple[ProcessInfo, ...]:
    """The processes with the TCP ports each listens on (where this user may read them)."""
    import psutil

    out = []
    for p in processes:
        ports: tuple[int, ...] = ()
        try:
            conns = psutil.Process(p.pid).net_connections(kind="inet")
            ports = tuple(sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}))
        except psutil.Error:
            pass
        out.append(ProcessInfo(p.pid, p.create_time, p.kind, p.command, p.ppid, p.descendant, ports))
    return tuple(out)


def orphans(processes: Iterable[ProcessInfo]) -> list[ProcessInfo]:
    """Processes no live session owns any more: re-parented to init (pid 1) after their session's
    process died. A Ray head's own processes are never among them: ``ray start`` daemonizes its
    raylet and GCS (parent init, yet a cluster someone runs), and a head ray.init started dies with
    its driver; only workers (``ray::...``) are, whose raylet is gone."""
    out = []
    for p in processes:
        if p.ppid != 1:
            continue
        if p.kind == "ray" and not p.command.startswith("ray::") and "default_worker.py" not in p.command:
            continue
        out.append(p)
    return out


def remove_processes(processes: Iterable[ProcessInfo], *, timeout_s: float = 15.0) -> list[tuple[ProcessInfo, str]]:
    """SIGTERM each (if it is still the same process), wait for them under a deadline, SIGKILL the rest.
    Returns those that could not be removed, with why."""
    import psutil

    live: list[tuple[ProcessInfo, Any]] = []
    failed: list[tuple[ProcessInfo, str]] = []
    for p in processes:
        try:
            proc = psutil.Process(p.pid)
            if abs(proc.create_time() - p.create_time) > 0.01:
                continue  # gone, and its pid reused by another process
            proc.terminate()
            live.append((p, proc))
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            failed.append((p, "permission denied; run `pdperf cleanup` as its owner"))
    if live:
        _, alive = psutil.wait_procs([proc for _, proc in live], timeout=timeout_s)
        for p, proc in live:
            if proc in alive:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
                except psutil.AccessDenied:
                    failed.append((p, "permission denied; run `pdperf cleanup` as its owner"))
        _, still = psutil.wait_procs(alive, timeout=timeout_s)
        failed += [(p, "still running after SIGKILL") for p, proc in live if proc in still]
    return failed


# -- GPUs ---------------------------------------------------------------------------------------------
def parse_compute_apps(text: str) -> tuple[GpuApp, ...]:
    """``nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits``."""
    out = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 3 or not row[0].strip().isdigit():
            continue
        mem = row[2].strip()
        out.append(GpuApp(int(row[0]), row[1].strip(), int(mem) if mem.isdigit() else None))
    return tuple(out)


def gpu_apps(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[tuple[GpuApp, ...] | None, str | None]:
    """The processes holding GPU memory on this machine, or None and why they were not looked at."""
    try:
        out = run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"],
                  capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "GPU memory not checked: no nvidia-smi on this machine"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"GPU memory not checked: nvidia-smi failed ({e})"
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()[:1]
        return None, f"GPU memory not checked: nvidia-smi exited {out.returncode} ({first[0] if first else ''})"
    return parse_compute_apps(out.stdout), None


# -- the Ray cluster ----------------------------------------------------------------------------------
def cluster_state() -> ClusterState:
    """The connected Ray cluster's Serve applications, live actors and placement groups not removed."""
    from ray import serve

    from pdperf import compat

    apps = tuple(sorted(serve.status().applications))
    actors = tuple(ActorInfo(str(a.get("ActorID")), str(a.get("ActorClassName") or ""), a.get("Pid") or None,
                             str(a.get("JobID")) if a.get("JobID") is not None else None, bool(a.get("IsDetached")))
                   for a in compat.actor_table() if a.get("State") != "DEAD")
    pgs = tuple(PlacementGroupInfo(str(p.get("placement_group_id")), str(p.get("name") or ""), str(p.get("state")))
                for p in compat.placement_groups() if p.get("state") != "REMOVED")
    return ClusterState(apps, actors, pgs)


def _app_of(name: str, apps: Iterable[str]) -> str | None:
    """The Serve application a replica actor class (``ServeReplica:<app>:<deployment>``) or a placement
    group (``SERVE_REPLICA::<app>#<deployment>#<id>``) belongs to, among ``apps``."""
    for app in apps:
        if name.startswith(f"{SERVE_REPLICA_PREFIX}{app}:") or f"{app}#" in name:
            return app
    return None


def diff_cluster(before: ClusterState | None, after: ClusterState, *, own_apps: Iterable[str], kept: Iterable[str] = (),
                 own_job_id: str | None = None) -> tuple[tuple[str, ...], tuple[ActorInfo, ...],
                                                         tuple[PlacementGroupInfo, ...], tuple[str, ...]]:
    """The Serve apps this session stood up (``own_apps``) that are still there, the live replicas and
    placement groups of those apps, and detached actors this session's driver (``own_job_id``) made;
    and what is expected (kept apps). Only what the session itself made counts: a cluster is shared
    (another session, pytest-xdist's other workers, the cluster's own applications deploy beside it),
    and an application that existed before the run is not this run's even where it took its name."""
    before = before or ClusterState()
    kept = set(kept)
    mine = set(own_apps) - set(before.serve_apps) - kept
    apps = tuple(a for a in after.serve_apps if a in mine)
    before_actors = {a.actor_id for a in before.actors}
    actors = tuple(a for a in after.actors if a.actor_id not in before_actors and a.class_name not in SYSTEM_ACTOR_CLASSES
                   and (_app_of(a.class_name, mine - set(apps)) is not None  # a replica its deleted app left
                        or (not a.class_name.startswith(SERVE_REPLICA_PREFIX) and a.detached
                            and own_job_id is not None and a.job_id == own_job_id)))
    before_pgs = {p.pg_id for p in before.placement_groups}
    pgs = tuple(p for p in after.placement_groups if p.pg_id not in before_pgs and _app_of(p.name, mine) is not None)
    expected = tuple(f"Serve app '{a}' (--keep-deployments)" for a in after.serve_apps if a in kept)
    return apps, actors, pgs, expected


# -- the check ----------------------------------------------------------------------------------------
def take_snapshot(*, own_pid: int | None = None, cluster: ClusterState | None = None,
                  gpus: Callable[[], tuple[tuple[GpuApp, ...] | None, str | None]] = gpu_apps) -> Snapshot:
    found, note = gpus()
    return Snapshot(list_processes(own_pid), found, note, cluster)


def diff(before: Snapshot, after: Snapshot, *, deployed: bool, own_apps: Iterable[str] = (), kept: Iterable[str] = (),
         own_job_id: str | None = None) -> Leftovers:
    """What ``after`` holds that ``before`` did not. A process counts when it descends from the session's
    process, or, where the session's engines run on this machine under its own local head or as its
    own ``vllm serve`` (``deployed``), when it is any new engine, ``vllm serve``, Ray or pdperf process:
    a killed replica's engine is re-parented to init and descends from no one. (A session that deployed
    nothing, or deployed on a cluster of --ray-address, does not count another session's new engines.)"""
    old = {p.key for p in before.processes}
    procs = tuple(p for p in after.processes if p.key not in old and (p.descendant or deployed))
    new_pids = {p.pid for p in procs}
    gpu: tuple[GpuApp, ...] = ()
    not_checked = [n for n in (before.gpu_note, after.gpu_note) if n]
    if before.gpu_apps is not None and after.gpu_apps is not None:
        held = {a.pid for a in before.gpu_apps}
        gpu = tuple(a for a in after.gpu_apps if a.pid not in held and (deployed or a.pid in new_pids))
    apps: tuple[str, ...] = ()
    actors: tuple[ActorInfo, ...] = ()
    pgs: tuple[PlacementGroupInfo, ...] = ()
    expected: tuple[str, ...] = ()
    if after.cluster is not None:
        apps, actors, pgs, expected = diff_cluster(before.cluster, after.cluster, own_apps=own_apps, kept=kept,
                                                   own_job_id=own_job_id)
    elif deployed:
        not_checked.append("Serve applications, actors and placement groups not listed: no cluster of "
                           "--ray-address (a local Ray head is shut down with the session; processes are checked)")
    return Leftovers(procs, gpu, apps, actors, pgs, expected, tuple(dict.fromkeys(not_checked)))


def settle(before: Snapshot, take: Callable[[], Snapshot], *, deployed: bool, own_apps: Iterable[str] = (),
           kept: Iterable[str] = (), own_job_id: str | None = None, timeout_s: float = EXIT_GRACE_S) -> Leftovers:
    """``diff`` against a fresh snapshot until nothing is left or ``timeout_s`` passes: teardown's
    processes take a moment to exit. Returns the last diff, leftovers with their listening ports."""
    last: list[Leftovers] = []

    def probe() -> Leftovers | None:
        found = diff(before, take(), deployed=deployed, own_apps=own_apps, kept=kept, own_job_id=own_job_id)
        last[:] = [found]
        return found if found.empty else None

    try:
        return poll_until(probe, what="the run's processes to exit", timeout_s=timeout_s)
    except WaitTimeout:
        return replace(last[0], processes=with_ports(last[0].processes))


@dataclass(frozen=True)
class CleanupPlan:
    """What ``pdperf cleanup`` removes: the suite's Serve apps on a cluster, orphaned processes here."""

    serve_apps: tuple[str, ...] = ()
    processes: tuple[ProcessInfo, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not (self.serve_apps or self.processes)

    def lines(self, verb: str) -> list[str]:
        return ([f"{verb} Serve application '{a}'" for a in self.serve_apps]
                + [f"{verb} {p.kind} process {p.describe()}" for p in self.processes])


def suite_apps(serve_apps: Iterable[str], topology_names: Iterable[str]) -> tuple[str, ...]:
    """The Serve applications the suite deploys (one per topology, named after it) among ``serve_apps``."""
    names = set(topology_names)
    return tuple(sorted(a for a in serve_apps if a in names))


def write_outcome(path: Path, leftovers: Leftovers) -> None:
    """``leftovers.json`` in the run folder: the check's outcome, for the report and CI."""
    import json

    from pdperf.results import atomic_write_text

    atomic_write_text(path, json.dumps(leftovers.to_dict(), indent=1) + "\n")


def delete_serve_apps(apps: Iterable[str], *, timeout_s: float = 120.0) -> None:
    """Delete Serve applications on the connected cluster and wait until their replicas and placement
    groups are released (as a session's teardown does)."""
    from pdperf.backends.ray_serve import delete_app

    for app in apps:
        delete_app(app, timeout_s=timeout_s)
