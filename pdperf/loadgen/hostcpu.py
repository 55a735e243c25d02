"""This host's serving processes during a load point: CPU they used, and time they waited for a CPU.

Why: on 4x H100 with eager engines a point's decode pace stepped from ~20 to ~33 ms per token
for a third of its requests, in a collocated run and in a PD run, while the GPUs' clocks stayed
at their maximum (docs/EXPERIMENTS.md, fifth and sixth sessions). Eager engines launch every
kernel from Python, so an engine whose threads sit runnable but without a CPU decodes slower
with the GPU waiting: the next suspect, and nothing recorded it. A point now keeps, per serving
process on the client's host, its CPU time (``/proc/<pid>/stat``: user + system of all its
threads) and its threads' run-queue wait (``/proc/<pid>/task/<tid>/schedstat``, second field:
nanoseconds runnable but not running), sampled by the parent process once a telemetry
interval. Both are in cores: 1.0 busy is one core's worth of CPU; 0.5 waiting is, on average,
half a thread ready to run and not running. A slow stretch with the engine's wait up says
"host CPU"; with its CPU down and no wait, look at the GPU side.

Which processes: vLLM's (their titles start ``VLLM::``: engine cores, TP workers), Ray Serve
replicas (``ray::ServeReplica:<app>:<deployment>``: ingress and LLM servers), and the no-Ray
backend's ``vllm serve`` API servers and PD proxy. Only this host's: a multi-node cluster's other
nodes are not seen. The sampler's own CPU time is kept beside its numbers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PREFIXES = ("VLLM::", "ray::ServeReplica")
_VLLM_CLI = ("vllm", "vllm.entrypoints.cli.main")  # `vllm serve …`, `python -m vllm.entrypoints.cli.main serve …`


def serving_title(cmdline: bytes) -> str | None:
    """The process's title if it is a serving process (see the module docstring), else None."""
    args = [a for a in cmdline.decode(errors="replace").split("\0") if a]
    if not args:
        return None
    first = args[0].strip()
    if first.startswith(_PREFIXES):
        return first.split(" ")[0][:120]
    for a, b in zip(args, args[1:]):
        if os.path.basename(a) in _VLLM_CLI and b == "serve":
            return "vllm serve"
    if "pdperf.backends.pd_proxy" in args:  # the no-Ray backend's PD router
        return "pd_proxy"
    return None


def _replica_parts(title: str) -> list[str]:
    """``ray::ServeReplica:<app>:<deployment>[:<model>]`` -> [app, deployment, ...]; [] for other titles."""
    return title.removeprefix("ray::ServeReplica:").split(":") if title.startswith("ray::ServeReplica:") else []


def _stat_fields(stat: str) -> list[str]:
    """``/proc/<pid>/stat`` after ``pid (comm) ``: state is [0], ppid [1], utime [11], stime [12]
    (the comm, a process title, may hold spaces and parentheses)."""
    return stat[stat.rindex(")") + 2:].split()


def role_of(title: str) -> str:
    """What a process does, without application names: ``ray::ServeReplica:app:LLMServer:app`` ->
    ``LLMServer``, ``VLLM::Worker_TP1`` -> ``VLLM::Worker``, ``VLLM::EngineCore`` as is."""
    parts = _replica_parts(title)
    if parts:
        return parts[1] if len(parts) > 1 and parts[1] else title
    if title.startswith("VLLM::Worker"):
        return "VLLM::Worker"
    return title


class HostCpuSampler:
    """CPU seconds and run-queue wait of this host's serving processes, sampled through a point."""

    def __init__(self, *, proc_root: str | Path = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = Path(proc_root)
        self.clock = clock
        self.t0: float | None = None
        self.titles: dict[int, str] = {}
        self.apps: dict[int, str] = {}  # pid -> Serve application ("" where none is known)
        self.series: dict[int, list[list[float]]] = {}  # pid -> [[t_s, cpu_s, wait_s]] (cumulative)
        self.errors: list[str] = []
        self.own_cpu_s = 0.0
        self.wait_available = True

    @staticmethod
    def available(proc_root: str | Path = "/proc") -> bool:
        return (Path(proc_root) / "self" / "stat").exists()

    def discover(self) -> None:
        """Find the serving processes (once, at the start: they live for the whole point), and the
        Serve application each belongs to: its own, or that of the replica it descends from (an
        engine core is a child of its LLM server replica)."""
        try:
            entries = [e for e in self.proc.iterdir() if e.name.isdigit()]
        except OSError as e:
            self.errors.append(f"{self.proc}: {e}"[:200])
            return
        parents: dict[int, int] = {}
        for e in entries:
            pid = int(e.name)
            try:
                title = serving_title((e / "cmdline").read_bytes())
                parents[pid] = int(_stat_fields((e / "stat").read_text())[1])
            except (OSError, ValueError, IndexError):  # gone, or not ours to read
                continue
            if title:
                self.titles[pid] = title
        for pid in self.titles:
            self.apps[pid] = self._app_of(pid, parents)

    def _app_of(self, pid: int, parents: dict[int, int]) -> str:
        seen = 0
        while pid and seen < 16:
            parts = _replica_parts(self.titles.get(pid, ""))
            if parts:
                return parts[0]
            pid, seen = parents.get(pid, 0), seen + 1
        return ""

    def _read(self, pid: int) -> tuple[float, float | None] | None:
        base = self.proc / str(pid)
        try:
            stat = (base / "stat").read_text()
        except OSError:
            return None  # the process ended
        fields = _stat_fields(stat)
        cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        wait_ns = 0
        try:
            for task in (base / "task").iterdir():
                try:
                    wait_ns += int((task / "schedstat").read_text().split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # a thread that ended, or a kernel without schedstats
        except OSError:
            return cpu_s, None
        return cpu_s, wait_ns / 1e9

    def sample(self) -> None:
        c0 = time.thread_time()
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
            self.discover()
        t = round(now - self.t0, 3)
        for pid in list(self.titles):
            got = self._read(pid)
            if got is None:
                continue
            cpu_s, wait_s = got
            if wait_s is None:
                self.wait_available = False
            self.series.setdefault(pid, []).append([t, cpu_s, wait_s if wait_s is not None else 0.0])
        self.own_cpu_s += time.thread_time() - c0

    def result(self) -> dict[str, Any]:
        """Per role (``<app>/<role>`` where the Serve application is known; summed over its
        processes): mean cores busy and waiting over the window, and the most cores waiting in any
        one sampling interval; per process the same and its series. Every serving process of the
        host is there, the measured application's and any other's up beside it."""
        if not self.series:
            return {"errors": self.errors[:5]} if self.errors else {}
        processes: dict[str, dict[str, Any]] = {}
        roles: dict[str, dict[str, Any]] = {}
        role_intervals: dict[str, dict[float, float]] = {}
        for pid, rows in sorted(self.series.items()):
            if len(rows) < 2 or rows[-1][0] <= rows[0][0]:
                continue
            span = rows[-1][0] - rows[0][0]
            busy = (rows[-1][1] - rows[0][1]) / span
            wait = (rows[-1][2] - rows[0][2]) / span
            steps = [(b[0], (b[2] - a[2]) / (b[0] - a[0])) for a, b in zip(rows, rows[1:]) if b[0] > a[0]]
            app = self.apps.get(pid, "")
            role = f"{app}/{role_of(self.titles[pid])}" if app else role_of(self.titles[pid])
            processes[str(pid)] = {"title": self.titles[pid], "app": app, "role": role, "cpu_cores": round(busy, 3),
                                   "wait_cores": round(wait, 3),
                                   "wait_cores_max": round(max((w for _, w in steps), default=0.0), 3)}
            r = roles.setdefault(role, {"processes": 0, "cpu_cores": 0.0, "wait_cores": 0.0})
            r["processes"] += 1
            r["cpu_cores"] = round(r["cpu_cores"] + busy, 3)
            r["wait_cores"] = round(r["wait_cores"] + wait, 3)
            per_t = role_intervals.setdefault(role, {})
            for t, w in steps:  # the role's summed wait per interval (processes sampled at one time)
                per_t[t] = per_t.get(t, 0.0) + w
        for role, per_t in role_intervals.items():
            roles[role]["wait_cores_max"] = round(max(per_t.values(), default=0.0), 3)
        return {"roles": roles, "processes": processes,
                "series": {str(pid): rows for pid, rows in self.series.items()},
                "series_fields": ["t_s", "cpu_s", "runqueue_wait_s"],
                "runqueue_wait": "available" if self.wait_available else "unavailable (no /proc/<pid>/task/*/schedstat)",
                "sampler_cpu_s": round(self.own_cpu_s, 4), "errors": self.errors[:5]}
