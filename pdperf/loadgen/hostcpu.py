"""This host's serving processes during a load point: CPU they used, time they waited for a CPU,
where they ran, and the CPU the hypervisor took.

Why: on 4x H100 with eager engines a point's decode pace stepped from ~20 to ~33 ms per token
for a third of its requests, in a collocated run and in a PD run, while the GPUs' clocks stayed
at their maximum (benchmarks/results/gpu-runs/SESSION-LOG.md, fifth and sixth sessions). Eager engines launch every
kernel from Python, so an engine whose threads sit runnable but without a CPU decodes slower
with the GPU waiting: the next suspect, and nothing recorded it. A point now keeps, per serving
process on the client's host, its CPU time (``/proc/<pid>/stat``: user + system of all its
threads) and its threads' run-queue wait (``/proc/<pid>/task/<tid>/schedstat``, second field:
nanoseconds runnable but not running), sampled by the parent process once a telemetry
interval. Both are in cores: 1.0 busy is one core's worth of CPU; 0.5 waiting is, on average,
half a thread ready to run and not running. A slow stretch with the engine's wait up says
"host CPU"; with its CPU down and no wait, look at the GPU side.

The next runs showed the pace still flipping between ~20 and ~33 ms per token for whole
stretches, with each engine core busy at ~1.0 core and its run-queue wait 0. Two host causes
slow a thread without any run-queue wait, and the sampler records both:

- Hypervisor steal (the machine is a VM): the aggregate ``cpu`` line of ``/proc/stat``, its
  ``steal`` column (8th value), system-wide. ``steal_cores`` is the mean over the point in cores
  (delta steal ticks / CLOCK_TICKS / elapsed s: 0.5 is half a vCPU's time, summed over all
  vCPUs, spent running someone else); ``steal_cores_max`` the most in one sampling interval;
  ``steal_series`` [[t_s, steal_s cumulative]] for lining it up with a slow stretch.
- SMT sibling contention: a thread that shares a physical core with another busy hardware
  thread runs up to ~1.5x slower while never waiting. Per sampled process, the logical CPU its
  busiest thread (most time on a CPU over the interval: the first field of its ``schedstat``,
  read for the wait anyway, or utime + stime of its ``stat`` without schedstats) last ran on
  (field 39 ``processor`` of ``/proc/<pid>/task/<tid>/stat``; the process's own ``stat`` where
  its tasks can't be read), and each logical CPU's busy fraction over the interval (the
  ``cpuN`` lines of ``/proc/stat``: 1 - (idle + iowait) / total). The topology comes from sysfs, read once per
  point: ``devices/system/cpu/cpuN/topology/thread_siblings_list`` and the ``cpuN/nodeK``
  entry (NUMA node). Per process: ``cpus_seen`` (distinct logical CPUs, sorted),
  ``numa_nodes_seen``, ``migrations`` (intervals in which that CPU changed) and
  ``sibling_busy_frac`` (fraction of intervals in which the CPU it ran on had an SMT sibling at
  least half busy over the interval; 0.0 where sysfs says the CPU has no sibling, None where
  sysfs or /proc/stat can't tell); per role the largest ``sibling_busy_frac`` of its
  processes. ``topology`` says what sysfs gave (logical CPUs, threads per core, NUMA nodes), or
  is None. It is a sample: the CPU is where the busiest thread ran last at the sample's time,
  not all of the interval.

Which processes: vLLM's (their titles start ``VLLM::``: engine cores, TP workers), Ray Serve
replicas (``ray::ServeReplica:<app>:<deployment>``: ingress and LLM servers), and the no-Ray
backend's ``vllm serve`` API servers and PD proxy. Only this host's: a multi-node cluster's other
nodes are not seen. The sampler's own CPU time is kept beside its numbers (``sampler_cpu_s``).
Missing files (a container's /proc, no sysfs, no SMT, a non-Linux host) give None or nothing,
never an error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: Process titles of serving processes: vLLM's own, Ray Serve replicas, and vLLM's GPU workers
#: under Ray's executor (TP > 1 in Ray Serve LLM: actors titled ``ray::RayWorkerWrapper`` or
#: ``ray::RayWorkerWrapper.<method>`` while running one; their parent is the raylet, so no
#: Serve application is known for them). Also listed by pdperf.diagnose.
SERVING_PREFIXES = ("VLLM::", "ray::ServeReplica", "ray::RayWorker")
_VLLM_CLI = ("vllm", "vllm.entrypoints.cli.main")  # `vllm serve …`, `python -m vllm.entrypoints.cli.main serve …`


def serving_title(cmdline: bytes) -> str | None:
    """The process's title if it is a serving process (see the module docstring), else None."""
    args = [a for a in cmdline.decode(errors="replace").split("\0") if a]
    if not args:
        return None
    first = args[0].strip()
    if first.startswith(SERVING_PREFIXES):
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
    """``/proc/<pid>/stat`` after ``pid (comm) ``: state is [0], ppid [1], utime [11], stime [12],
    processor [36] (``man 5 proc`` numbers fields from 1 = pid, so field N is [N - 3]; the comm, a
    process title, may hold spaces and parentheses)."""
    return stat[stat.rindex(")") + 2:].split()


_PROCESSOR = 36  # field 39, the CPU the task last ran on


def parse_cpu_list(text: str) -> list[int]:
    """A sysfs CPU list (``0,32``, ``0-1``, ``5``, ``0-1,32-33``) -> sorted CPUs; [] where unreadable."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            cpus.update(range(int(lo), int(hi) + 1) if sep else (int(lo),))
        except ValueError:
            continue  # an empty list, or a form this parser doesn't know
    return sorted(cpus)


def read_topology(sys_root: str | Path = "/sys") -> tuple[dict[int, list[int]], dict[int, int]]:
    """Each logical CPU's SMT siblings (the other hardware threads of its core; [] for none) and
    its NUMA node, from sysfs; CPUs sysfs doesn't describe are left out (all, without sysfs)."""
    siblings: dict[int, list[int]] = {}
    nodes: dict[int, int] = {}
    base = Path(sys_root) / "devices" / "system" / "cpu"
    try:
        dirs = [d for d in base.iterdir() if d.name.startswith("cpu") and d.name[3:].isdigit()]
    except OSError:
        return siblings, nodes
    for d in dirs:
        cpu = int(d.name[3:])
        try:
            listed = parse_cpu_list((d / "topology" / "thread_siblings_list").read_text())
        except OSError:
            listed = []  # an offline CPU, or a kernel without topology
        if cpu in listed:
            siblings[cpu] = [c for c in listed if c != cpu]
        try:
            node = [e.name for e in d.iterdir() if e.name.startswith("node") and e.name[4:].isdigit()]
        except OSError:
            node = []
        if node:
            nodes[cpu] = int(node[0][4:])
    return siblings, nodes


def read_proc_stat(proc_root: str | Path = "/proc") -> tuple[int | None, dict[int, tuple[int, int]]]:
    """``/proc/stat``: the system's steal ticks (None where unknown) and, per logical CPU, its
    (total, busy) ticks, busy = total - idle - iowait; guest time is inside user already, so the
    total is user..steal. (None, {}) where unreadable."""
    try:
        text = (Path(proc_root) / "stat").read_text()
    except OSError:
        return None, {}
    steal: int | None = None
    per_cpu: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            break  # the cpu lines come first; the rest (intr ...) is long and not needed
        parts = line.split()
        try:
            vals = [int(v) for v in parts[1:9]]
        except ValueError:
            continue
        if len(vals) < 4:
            continue
        total = sum(vals)
        busy = total - vals[3] - (vals[4] if len(vals) > 4 else 0)
        if parts[0] == "cpu":
            steal = vals[7] if len(vals) > 7 else None
        elif parts[0][3:].isdigit():
            per_cpu[int(parts[0][3:])] = (total, busy)
    return steal, per_cpu


def role_of(title: str) -> str:
    """What a process does, without application names: ``ray::ServeReplica:app:LLMServer:app`` ->
    ``LLMServer``, ``VLLM::Worker_TP1`` -> ``VLLM::Worker``, ``ray::RayWorkerWrapper.execute_method``
    -> ``RayWorker``, ``VLLM::EngineCore`` as is."""
    parts = _replica_parts(title)
    if parts:
        return parts[1] if len(parts) > 1 and parts[1] else title
    if title.startswith("VLLM::Worker"):
        return "VLLM::Worker"
    if title.startswith("ray::RayWorker"):  # vLLM's TP worker under Ray, busy or idle
        return "RayWorker"
    return title


class HostCpuSampler:
    """CPU seconds, run-queue wait and logical CPU of this host's serving processes, and the
    system's steal time, sampled through a point."""

    def __init__(self, *, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = Path(proc_root)
        self.sys = Path(sys_root)
        self.clock = clock
        self.t0: float | None = None
        self.titles: dict[int, str] = {}
        self.apps: dict[int, str] = {}  # pid -> Serve application ("" where none is known)
        # pid -> [[t_s, cpu_s, wait_s (cumulative), cpu, sibling_busy]] (see SERIES_FIELDS)
        self.series: dict[int, list[list[Any]]] = {}
        self.steal_series: list[list[float]] = []  # [[t_s, steal_s]] (cumulative, all CPUs)
        self.siblings: dict[int, list[int]] = {}  # logical CPU -> its SMT siblings (sysfs)
        self.nodes: dict[int, int] = {}  # logical CPU -> NUMA node (sysfs)
        self.topology_read = False
        self.errors: list[str] = []
        self.own_cpu_s = 0.0
        self.wait_available = True
        self._thread_run: dict[int, dict[int, int]] = {}  # pid -> tid -> ns on a CPU at the last sample
        self._cpu_ticks: dict[int, tuple[int, int]] = {}  # logical CPU -> (total, busy) at the last sample

    SERIES_FIELDS = ["t_s", "cpu_s", "runqueue_wait_s", "cpu", "sibling_busy"]

    @staticmethod
    def available(proc_root: str | Path = "/proc") -> bool:
        return (Path(proc_root) / "self" / "stat").exists()

    def discover(self) -> None:
        """Find the serving processes (once, at the start: they live for the whole point), and the
        Serve application each belongs to: its own, or that of the replica it descends from (an
        engine core is a child of its LLM server replica); and read the CPU topology."""
        if not self.topology_read:
            self.siblings, self.nodes = read_topology(self.sys)
            self.topology_read = True
        try:
            entries = [e for e in self.proc.iterdir() if e.name.isdigit()]
        except OSError as err:
            self.errors.append(f"{self.proc}: {err}"[:200])
            return
        parents: dict[int, int] = {}
        for entry in entries:
            pid = int(entry.name)
            try:
                title = serving_title((entry / "cmdline").read_bytes())
                parents[pid] = int(_stat_fields((entry / "stat").read_text())[1])
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

    def _read(self, pid: int) -> tuple[float, float | None, int | None] | None:
        """(CPU s, run-queue wait s or None, logical CPU of the busiest thread or None). Each
        thread's ``schedstat`` gives its wait and its time on a CPU (ns, the same as its utime +
        stime, finer), so only the busiest thread's ``stat`` is read for its CPU; without
        schedstats every thread's ``stat`` is read for its utime + stime."""
        base = f"{self.proc}/{pid}"
        try:
            fields = _stat_fields(_slurp(f"{base}/stat"))
            cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        except (OSError, IndexError, ValueError):
            return None  # the process ended (or a stat this parser can't read)
        try:
            tids = [int(t) for t in os.listdir(f"{base}/task") if t.isdigit()]
        except OSError:
            return cpu_s, None, _int_at(fields, _PROCESSOR)
        before = self._thread_run.get(pid, {})
        run: dict[int, int] = {}  # tid -> ns on a CPU, cumulative
        wait_ns = 0
        for tid in tids:
            try:
                parts = _slurp(f"{base}/task/{tid}/schedstat").split()
                run[tid], wait_ns = int(parts[0]), wait_ns + int(parts[1])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended, or a kernel without schedstats
        cpu_of: dict[int, int] = {}
        if not run:  # no schedstats: every thread's utime + stime, and its CPU with it
            for tid in tids:
                try:
                    tf = _stat_fields(_slurp(f"{base}/task/{tid}/stat"))
                    run[tid] = (int(tf[11]) + int(tf[12])) * 1_000_000_000 // CLOCK_TICKS
                    cpu_of[tid] = int(tf[_PROCESSOR])
                except (OSError, IndexError, ValueError):
                    continue
        self._thread_run[pid] = run
        cpu = None
        if run:  # the thread that ran most since the last sample (since it started, at the first)
            busiest = max(run, key=lambda tid: (run[tid] - before.get(tid, 0), tid == pid))
            if busiest in cpu_of:
                cpu = cpu_of[busiest]
            else:
                try:
                    cpu = int(_stat_fields(_slurp(f"{base}/task/{busiest}/stat"))[_PROCESSOR])
                except (OSError, IndexError, ValueError):
                    pass
        return cpu_s, wait_ns / 1e9, cpu if cpu is not None else _int_at(fields, _PROCESSOR)

    def _sibling_busy(self, cpu: int | None, busy: dict[int, float]) -> float | None:
        """The busiest SMT sibling of ``cpu`` over the interval (0.0: it has none; None: unknown)."""
        if cpu is None or cpu not in self.siblings:
            return None
        if not self.siblings[cpu]:
            return 0.0
        known = [busy[c] for c in self.siblings[cpu] if c in busy]
        return round(max(known), 3) if known else None

    def sample(self) -> None:
        c0 = time.thread_time()
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
            self.discover()
        t = round(now - self.t0, 3)
        steal, cpu_ticks = read_proc_stat(self.proc)
        if steal is not None:
            self.steal_series.append([t, round(steal / CLOCK_TICKS, 3)])
        busy: dict[int, float] = {}  # logical CPU -> busy fraction since the last sample
        for c, (total, b) in cpu_ticks.items():
            prev = self._cpu_ticks.get(c)
            if prev and total > prev[0]:
                busy[c] = min(1.0, max(0.0, (b - prev[1]) / (total - prev[0])))
        self._cpu_ticks = cpu_ticks
        for pid in list(self.titles):
            got = self._read(pid)
            if got is None:
                continue
            cpu_s, wait_s, cpu = got
            if wait_s is None:
                self.wait_available = False
            rows = self.series.setdefault(pid, [])
            sib = self._sibling_busy(cpu, busy) if rows else None  # the first sample ends no interval
            rows.append([t, cpu_s, wait_s if wait_s is not None else 0.0, cpu, sib])
        self.own_cpu_s += time.thread_time() - c0

    def _host(self) -> dict[str, Any]:
        """The system-wide fields: steal, and the topology sysfs gave."""
        rows = self.steal_series
        steal = steal_max = None
        if len(rows) >= 2 and rows[-1][0] > rows[0][0]:
            steal = round((rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0]), 3)
            steal_max = round(max(((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(rows, rows[1:]) if b[0] > a[0]),
                                  default=0.0), 3)
        topology = None
        if self.siblings:
            topology = {"logical_cpus": len(self.siblings),
                        "threads_per_core": max(len(s) + 1 for s in self.siblings.values()),
                        "numa_nodes": len(set(self.nodes.values())) or None}
        return {"steal_cores": steal, "steal_cores_max": steal_max, "steal_series": rows, "topology": topology}

    def _placement(self, rows: list[list[Any]]) -> dict[str, Any]:
        """Where a process's busiest thread ran: CPUs and NUMA nodes seen, migrations between
        samples, and the fraction of intervals with an SMT sibling at least half busy."""
        cpus = [r[3] for r in rows if r[3] is not None]
        sib = [r[4] for r in rows[1:] if r[4] is not None]
        return {"cpus_seen": sorted(set(cpus)),
                "numa_nodes_seen": sorted({self.nodes[c] for c in cpus if c in self.nodes}),
                "migrations": sum(1 for a, b in zip(rows, rows[1:])
                                  if a[3] is not None and b[3] is not None and a[3] != b[3]),
                "sibling_busy_frac": round(sum(1 for v in sib if v >= 0.5) / len(sib), 3) if sib else None}

    def result(self) -> dict[str, Any]:
        """Per role (``<app>/<role>`` where the Serve application is known; summed over its
        processes): mean cores busy and waiting over the window, and the most cores waiting in any
        one sampling interval, the largest ``sibling_busy_frac`` of its processes; per process the
        same, where it ran (see the module docstring) and its series; the system's steal. Every
        serving process of the host is there, the measured application's and any other's up
        beside it. Steal alone where no serving process was found; nothing where /proc has neither."""
        if not self.series:
            if len(self.steal_series) >= 2:
                return {**self._host(), "roles": {}, "processes": {},
                        "sampler_cpu_s": round(self.own_cpu_s, 4), "errors": self.errors[:5]}
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
            placement = self._placement(rows)
            processes[str(pid)] = {"title": self.titles[pid], "app": app, "role": role, "cpu_cores": round(busy, 3),
                                   "wait_cores": round(wait, 3),
                                   "wait_cores_max": round(max((w for _, w in steps), default=0.0), 3), **placement}
            r = roles.setdefault(role, {"processes": 0, "cpu_cores": 0.0, "wait_cores": 0.0, "sibling_busy_frac": None})
            r["processes"] += 1
            r["cpu_cores"] = round(r["cpu_cores"] + busy, 3)
            r["wait_cores"] = round(r["wait_cores"] + wait, 3)
            if placement["sibling_busy_frac"] is not None:
                r["sibling_busy_frac"] = max(r["sibling_busy_frac"] or 0.0, placement["sibling_busy_frac"])
            per_t = role_intervals.setdefault(role, {})
            for t, w in steps:  # the role's summed wait per interval (processes sampled at one time)
                per_t[t] = per_t.get(t, 0.0) + w
        for role, per_t in role_intervals.items():
            roles[role]["wait_cores_max"] = round(max(per_t.values(), default=0.0), 3)
        return {"roles": roles, "processes": processes,
                "series": {str(pid): rows for pid, rows in self.series.items()},
                "series_fields": list(self.SERIES_FIELDS),
                "runqueue_wait": "available" if self.wait_available else "unavailable (no /proc/<pid>/task/*/schedstat)",
                **self._host(), "sampler_cpu_s": round(self.own_cpu_s, 4), "errors": self.errors[:5]}


def _slurp(path: str) -> str:
    """A small /proc file in one read (cheaper than Path.read_text, as a sample reads hundreds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)


def _int_at(fields: list[str], i: int) -> int | None:
    try:
        return int(fields[i])
    except (IndexError, ValueError):
        return None
