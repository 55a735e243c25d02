"""The host-CPU sampler of serving processes (pdperf.loadgen.hostcpu).

A fake /proc tree stands in for the processes of a GPU host (engine cores, Ray replicas, a
`vllm serve`, an unrelated python); its counters are advanced between samples, so the cores
busy and waiting are known. A fake /proc/stat (per-CPU and steal ticks) and a fake sysfs CPU
topology (SMT siblings, NUMA nodes) give steal, the busiest thread's CPU and its sibling's
load. The real /proc of this machine checks the reading itself: a child process with a serving
title that burns CPU is found and shows busy, with its CPU and the system's steal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdperf.loadgen.hostcpu import (
    CLOCK_TICKS,
    HostCpuSampler,
    parse_cpu_list,
    read_proc_stat,
    read_topology,
    role_of,
    serving_title,
)
from pdperf.loadgen.telemetry import TelemetryWindow
from pdperf.results import Telemetry

pytestmark = pytest.mark.selftest


class FakeProc:
    """A /proc with processes whose CPU ticks and per-thread run-queue wait the test sets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "self").mkdir(parents=True)
        (root / "self" / "stat").write_text("1 (x) S")

    def add(self, pid: int, cmdline: list[str], threads: int = 2, ppid: int = 1) -> None:
        d = self.root / str(pid)
        self.ppid = getattr(self, "ppid", {})
        self.ppid[pid] = ppid
        (d / "task").mkdir(parents=True)
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
        for t in range(threads):
            (d / "task" / str(pid + t)).mkdir()
        self.set(pid, cpu_s=0.0, wait_s=[0.0] * threads)

    def set(self, pid: int, *, cpu_s: float, wait_s: list[float], cpu: int | None = None) -> None:
        """The process's CPU time and its threads' wait; ``cpu`` None writes a short stat, without
        field 39 (processor), as the test before it did."""
        d = self.root / str(pid)
        (d / "stat").write_text(stat_line(pid, self.ppid[pid], cpu_s, cpu))
        for t, w in zip(sorted((d / "task").iterdir()), wait_s):
            run = (t / "schedstat").read_text().split()[0] if (t / "schedstat").exists() else "123"
            (t / "schedstat").write_text(f"{run} {int(w * 1e9)} 7\n")

    def thread(self, pid: int, tid: int, *, cpu_s: float, cpu: int, schedstat: bool = True) -> None:
        """A thread's own stat: its CPU time and the logical CPU it last ran on; its schedstat's
        time on a CPU (its wait kept) unless ``schedstat`` is False."""
        t = self.root / str(pid) / "task" / str(tid)
        t.joinpath("stat").write_text(stat_line(tid, self.ppid[pid], cpu_s, cpu))
        if schedstat:
            wait = (t / "schedstat").read_text().split()[1] if (t / "schedstat").exists() else "0"
            (t / "schedstat").write_text(f"{int(cpu_s * 1e9)} {wait} 7\n")
        else:
            (t / "schedstat").unlink(missing_ok=True)

    def cpus(self, seconds: float, busy: dict[int, float], steal_cores: float = 0.0) -> None:
        """Advance /proc/stat by ``seconds``: each CPU busy its fraction of them, ``steal_cores``
        of steal over all CPUs (the aggregate line only, as a VM's steal is spread over them)."""
        self.ticks = getattr(self, "ticks", {})
        self.steal = getattr(self, "steal", 0) + int(round(steal_cores * seconds * CLOCK_TICKS))
        for c, f in busy.items():
            b, i = self.ticks.get(c, (0, 0))
            self.ticks[c] = (b + int(round(f * seconds * CLOCK_TICKS)), i + int(round((1 - f) * seconds * CLOCK_TICKS)))
        b_all, i_all = sum(b for b, _ in self.ticks.values()), sum(i for _, i in self.ticks.values())
        # user nice system idle iowait irq softirq steal guest guest_nice; busy split over user and
        # system, idle over idle and iowait, as both count
        lines = [f"cpu  {b_all} 0 0 {i_all} 0 0 0 {self.steal} 0 0"]
        lines += [f"cpu{c} {b - b // 3} 0 {b // 3} {i - i // 4} {i // 4} 0 0 0 0 0"
                  for c, (b, i) in sorted(self.ticks.items())]
        lines += ["intr 12345 1 2 3", "ctxt 99", "btime 1700000000"]
        (self.root / "stat").write_text("\n".join(lines) + "\n")


def stat_line(pid: int, ppid: int, cpu_s: float, cpu: int | None) -> str:
    """A /proc/<pid>/stat line: comm with a space and a parenthesis, as a process title can have;
    utime and stime split; with ``cpu``, all 52 fields and the CPU as field 39."""
    ticks = int(round(cpu_s * CLOCK_TICKS))
    head = f"{pid} (VLLM::Engine (x)) S {ppid} 1 1 0 -1 0 0 0 0 0 {ticks // 2} {ticks - ticks // 2} 0 0 20 0 1 0 0 0 0"
    if cpu is None:
        return head
    fields = head.split(") ")[1].split()  # field 3 (state) onwards: 21 so far, fields 3..23
    fields += ["0"] * (35 - len(fields)) + ["17", str(cpu)] + ["0"] * 13  # 38 exit_signal, 39 processor, ..52
    return head.split(") ")[0] + ") " + " ".join(fields)


class FakeSys:
    """A sysfs CPU topology: ``siblings`` per core, ``node`` per CPU."""

    def __init__(self, root: Path, cores: list[str], node: dict[int, int]) -> None:
        self.root = root
        base = root / "devices" / "system" / "cpu"
        (base / "cpufreq").mkdir(parents=True)  # not a cpuN
        for listed in cores:
            for c in parse_cpu_list(listed):
                (base / f"cpu{c}" / "topology").mkdir(parents=True)
                (base / f"cpu{c}" / "topology" / "thread_siblings_list").write_text(listed + "\n")
                if c in node:
                    (base / f"cpu{c}" / f"node{node[c]}").mkdir()


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("cmdline, title", [
    (["VLLM::EngineCore"], "VLLM::EngineCore"),
    (["VLLM::Worker_TP1"], "VLLM::Worker_TP1"),
    (["ray::ServeReplica:colloc-2xtp1:LLMServer:colloc-2xtp1"], "ray::ServeReplica:colloc-2xtp1:LLMServer:colloc-2xtp1"),
    (["/srv/.venv/bin/vllm", "serve", "/m", "--port", "8000"], "vllm serve"),
    (["/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/m"], "vllm serve"),
    (["/usr/bin/python3", "-m", "pdperf.backends.pd_proxy", "--port", "9"], "pd_proxy"),
    (["/usr/bin/python3", "-m", "pytest", "-m", "sweep"], None),
    (["ray::RayWorkerWrapper.execute_method"], "ray::RayWorkerWrapper.execute_method"),  # TP worker under Ray
    (["ray::RayWorkerWrapper"], "ray::RayWorkerWrapper"),
    (["ray::IDLE"], None),
    ([], None),
])
def test_serving_titles(cmdline, title):
    raw = b"\0".join(a.encode() for a in cmdline) + (b"\0" if cmdline else b"")
    assert serving_title(raw) == title


def test_roles_drop_application_names():
    assert role_of("ray::ServeReplica:pd-1p1-1d1-pack:PDProxyServer") == "PDProxyServer"
    assert role_of("ray::ServeReplica:colloc-2xtp1:LLMServer:colloc-2xtp1") == "LLMServer"
    assert role_of("VLLM::Worker_TP0") == "VLLM::Worker"
    assert role_of("VLLM::EngineCore") == "VLLM::EngineCore"
    assert role_of("ray::RayWorkerWrapper.execute_method") == role_of("ray::RayWorkerWrapper") == "RayWorker"


def test_busy_and_waiting_cores_per_role(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(101, ["VLLM::EngineCore"])
    proc.add(201, ["VLLM::EngineCore"])
    proc.add(301, ["ray::ServeReplica:app:OpenAiIngress"], threads=1)
    proc.add(401, ["/usr/bin/python3", "-m", "pytest"])  # not a serving process
    proc.add(501, ["ray::ServeReplica:pd:Decode:pd"], threads=1)
    proc.add(502, ["/usr/bin/python3", "-c", "spawn"], threads=1, ppid=501)  # an unnamed process between
    proc.add(503, ["VLLM::EngineCore"], threads=1, ppid=502)  # the decode replica's engine
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "sys", clock=clock)
    s.sample()  # t=0: discovers, reads the starting counters
    clock.t += 2.0  # 2 s: engine 101 busy 1 core, no wait; 201 busy 0.5 core, waited 0.5 core
    proc.set(101, cpu_s=2.0, wait_s=[0.0, 0.0])
    proc.set(201, cpu_s=1.0, wait_s=[0.6, 0.4])
    proc.set(301, cpu_s=0.2, wait_s=[0.0])
    s.sample()
    clock.t += 2.0  # 2 s more: 201 waits 1.5 cores now (a slow stretch), 101 unchanged pace
    proc.set(101, cpu_s=4.0, wait_s=[0.0, 0.0])
    proc.set(201, cpu_s=1.5, wait_s=[2.6, 1.4])
    s.sample()
    r = s.result()
    assert set(s.titles) == {101, 201, 301, 501, 503}
    assert s.apps == {101: "", 201: "", 301: "app", 501: "pd", 503: "pd"}
    assert {"pd/Decode", "pd/VLLM::EngineCore", "app/OpenAiIngress"} <= set(r["roles"])
    engine = r["roles"]["VLLM::EngineCore"]
    assert engine["processes"] == 2
    assert engine["cpu_cores"] == pytest.approx(1.0 + 0.375, abs=0.01)  # (4 + 1.5) cpu-s over 4 s
    assert engine["wait_cores"] == pytest.approx(1.0, abs=0.01)  # (0 + 4) wait-s over 4 s
    assert engine["wait_cores_max"] == pytest.approx(1.5, abs=0.01)  # the second interval
    assert r["processes"]["201"]["wait_cores_max"] == pytest.approx(1.5, abs=0.01)
    assert r["roles"]["app/OpenAiIngress"]["cpu_cores"] == pytest.approx(0.05, abs=0.01)  # 0.2 cpu-s over 4 s
    assert r["processes"]["503"]["app"] == "pd" and r["processes"]["503"]["role"] == "pd/VLLM::EngineCore"
    assert r["series_fields"][:3] == ["t_s", "cpu_s", "runqueue_wait_s"] and len(r["series"]["101"]) == 3
    assert r["runqueue_wait"] == "available" and r["sampler_cpu_s"] >= 0
    # no /proc/stat, no sysfs, no field 39 in these stats: nothing known of steal or placement, and no error
    assert r["steal_cores"] is None and r["steal_cores_max"] is None and r["topology"] is None
    assert r["processes"]["101"]["cpus_seen"] == [] and r["processes"]["101"]["sibling_busy_frac"] is None
    assert engine["sibling_busy_frac"] is None


def test_a_process_that_ends_and_a_kernel_without_schedstat(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(101, ["VLLM::EngineCore"], threads=1)
    proc.add(201, ["VLLM::EngineCore"], threads=1)
    s = HostCpuSampler(proc_root=proc.root, clock=clock)
    s.sample()
    for f in (proc.root / "101" / "task").rglob("schedstat"):
        f.unlink()  # no schedstats on this kernel
    (proc.root / "201" / "stat").unlink()  # 201 ended
    clock.t += 1.0
    proc.set(101, cpu_s=0.9, wait_s=[])
    s.sample()
    r = s.result()
    assert r["processes"]["101"]["cpu_cores"] == pytest.approx(0.9, abs=0.02)
    assert "201" not in r["processes"]  # one sample is no interval


def test_nothing_found_gives_nothing(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(401, ["/usr/bin/python3", "-m", "pytest"])
    s = HostCpuSampler(proc_root=proc.root)
    s.sample()
    s.sample()
    assert s.result() == {}
    assert HostCpuSampler.available(proc.root) and not HostCpuSampler.available(tmp_path / "none")


def test_the_telemetry_window_carries_it(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(101, ["VLLM::EngineCore"])
    window = TelemetryWindow([], host=HostCpuSampler(proc_root=proc.root, clock=clock))
    assert window.active
    window.start()
    clock.t += 1.0
    proc.set(101, cpu_s=1.0, wait_s=[0.1, 0.0])
    window.stop()
    assert window.result().host_cpu["roles"]["VLLM::EngineCore"]["cpu_cores"] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("listed, cpus", [
    ("0,32", [0, 32]), ("0-1", [0, 1]), ("5", [5]), ("0-1,32-33\n", [0, 1, 32, 33]), ("", []), ("x,3", [3]),
])
def test_sibling_lists(listed, cpus):
    assert parse_cpu_list(listed) == cpus


def test_topology_from_sysfs(tmp_path):
    """SMT pairs written as "0,2" and "1-2"-style ranges, a core without SMT, an offline CPU
    without topology, NUMA nodes; and no sysfs at all."""
    FakeSys(tmp_path / "sys", ["0,2", "1,3", "4", "5-6"], node={0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1})
    (tmp_path / "sys" / "devices" / "system" / "cpu" / "cpu7").mkdir()  # offline: no topology
    siblings, nodes = read_topology(tmp_path / "sys")
    assert siblings == {0: [2], 2: [0], 1: [3], 3: [1], 4: [], 5: [6], 6: [5]}
    assert nodes == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert read_topology(tmp_path / "none") == ({}, {})


def test_steal_cores(tmp_path):
    """Steal from the aggregate cpu line: 0.5 cores for 2 s, then 1.5 cores for 2 s."""
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(101, ["VLLM::EngineCore"], threads=1)
    proc.cpus(0, {0: 0.0, 1: 0.0})
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "sys", clock=clock)
    s.sample()
    for steal in (0.5, 1.5):
        clock.t += 2.0
        proc.cpus(2.0, {0: 1.0, 1: 0.2}, steal_cores=steal)
        s.sample()
    r = s.result()
    assert r["steal_cores"] == pytest.approx(1.0, abs=0.01)  # 4 steal-s over 4 s
    assert r["steal_cores_max"] == pytest.approx(1.5, abs=0.01)
    assert [t for t, _ in r["steal_series"]] == [0.0, 2.0, 4.0]
    steal_ticks, per_cpu = read_proc_stat(proc.root)
    assert steal_ticks == int(round(4 * CLOCK_TICKS)) and per_cpu[1][1] / per_cpu[1][0] == pytest.approx(0.2, abs=0.01)


def test_steal_alone_without_serving_processes(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.cpus(0, {0: 0.0})
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "sys", clock=clock)
    s.sample()
    clock.t += 1.0
    proc.cpus(1.0, {0: 0.5}, steal_cores=0.25)
    s.sample()
    r = s.result()
    assert r["roles"] == {} and r["steal_cores"] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("schedstat", [True, False], ids=["schedstat", "no-schedstat"])
def test_the_busiest_threads_cpu_and_migrations(tmp_path, schedstat):
    """Three threads: the main one busiest in all its life, another busiest in each interval; the
    CPU is that of the thread busiest over the interval, not over its life. Its time on a CPU from
    schedstat, or, on a kernel without schedstats, from each thread's utime + stime."""
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(100, ["VLLM::EngineCore"], threads=3)
    FakeSys(tmp_path / "sys", ["0,2", "1,3"], node={0: 0, 2: 0, 1: 1, 3: 1})
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "sys", clock=clock)
    proc.thread(100, 100, cpu_s=50.0, cpu=3, schedstat=schedstat)  # the main thread, busy before the point
    proc.thread(100, 101, cpu_s=1.0, cpu=0, schedstat=schedstat)
    proc.thread(100, 102, cpu_s=0.0, cpu=1, schedstat=schedstat)
    s.sample()  # no interval yet: the busiest over its life (the main thread, on CPU 3)
    moves = [(101, 0), (102, 1), (102, 1), (101, 0)]  # the thread that does the work in each interval
    spent = {100: 50.0, 101: 1.0, 102: 0.0}
    for tid, cpu in moves:
        clock.t += 1.0
        spent[tid] += 0.9
        spent[100] += 0.05
        proc.thread(100, 100, cpu_s=spent[100], cpu=3, schedstat=schedstat)
        proc.thread(100, tid, cpu_s=spent[tid], cpu=cpu, schedstat=schedstat)
        s.sample()
    assert [row[3] for row in s.series[100]] == [3, 0, 1, 1, 0]
    got = s.result()["processes"]["100"]
    assert got["cpus_seen"] == [0, 1, 3] and got["numa_nodes_seen"] == [0, 1]
    assert got["migrations"] == 3  # 3 -> 0, 0 -> 1, 1 -> 0


def test_the_process_stat_when_its_threads_cant_be_read(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(100, ["VLLM::EngineCore"], threads=1)
    proc.set(100, cpu_s=0.0, wait_s=[0.0], cpu=4)
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "sys", clock=clock)
    s.sample()
    shutil.rmtree(proc.root / "100" / "task")  # no tasks: a /proc that hides them
    clock.t += 1.0
    (proc.root / "100" / "stat").write_text(stat_line(100, 1, 1.0, cpu=5))
    s.sample()
    got = s.result()
    assert [row[3] for row in s.series[100]] == [4, 5] and got["processes"]["100"]["migrations"] == 1
    assert got["runqueue_wait"].startswith("unavailable")


def test_sibling_busy_frac(tmp_path):
    """Engine 100 runs on CPU 0, whose SMT sibling CPU 2 is busy 0.9, 0.1, 0.6, 0.4 of four
    intervals: a busy sibling in half of them. Engine 200 runs on CPU 4, a core without SMT: 0.0.
    Engine 300 on CPU 1, whose sibling /proc/stat doesn't list: unknown."""
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    FakeSys(tmp_path / "sys", ["0,2", "1,3", "4"], node={0: 0, 1: 0, 2: 0, 3: 0, 4: 1})
    for pid, cpu in ((100, 0), (200, 4), (300, 1)):
        proc.add(pid, ["VLLM::EngineCore"], threads=1)
        proc.thread(pid, pid, cpu_s=0.0, cpu=cpu)
    proc.cpus(0, {0: 0, 1: 0, 2: 0, 4: 0})
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "sys", clock=clock)
    s.sample()
    for i, sibling in enumerate((0.9, 0.1, 0.6, 0.4)):
        clock.t += 1.0
        proc.cpus(1.0, {0: 1.0, 1: 1.0, 2: sibling, 4: 1.0})
        for pid, cpu in ((100, 0), (200, 4), (300, 1)):
            proc.thread(pid, pid, cpu_s=i + 1.0, cpu=cpu)
        s.sample()
    r = s.result()
    assert [row[4] for row in s.series[100]] == [None, 0.9, 0.1, 0.6, 0.4]
    assert r["processes"]["100"]["sibling_busy_frac"] == 0.5
    assert r["processes"]["200"]["sibling_busy_frac"] == 0.0
    assert r["processes"]["300"]["sibling_busy_frac"] is None
    assert r["processes"]["100"]["migrations"] == 0 and r["processes"]["200"]["numa_nodes_seen"] == [1]
    assert r["roles"]["VLLM::EngineCore"]["sibling_busy_frac"] == 0.5  # the largest of its processes
    assert r["topology"] == {"logical_cpus": 5, "threads_per_core": 2, "numa_nodes": 2}
    assert r["series_fields"] == ["t_s", "cpu_s", "runqueue_wait_s", "cpu", "sibling_busy"]


def test_no_sysfs_no_proc_stat_and_garbage(tmp_path):
    """A container's view: no sysfs, /proc/stat garbled, thread stats cut short. Nothing raises;
    what can't be known is None or empty."""
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(100, ["VLLM::EngineCore"], threads=1)
    proc.thread(100, 100, cpu_s=0.0, cpu=2)
    (proc.root / "stat").write_text("cpu x y\ncpu0 1 2\ncpuX 1 2 3 4\n")
    s = HostCpuSampler(proc_root=proc.root, sys_root=tmp_path / "no-sys", clock=clock)
    s.sample()
    clock.t += 1.0
    (proc.root / "100" / "task" / "100" / "stat").write_text("100 (x) S 1 2")
    s.sample()
    r = s.result()
    assert r["steal_cores"] is None and r["topology"] is None
    assert r["processes"]["100"]["cpus_seen"] == [2] and r["processes"]["100"]["sibling_busy_frac"] is None


def test_the_report_line_tells_steal_and_the_engines_sibling(tmp_path):
    from pdperf.report.html import _host_cpu_text

    class Point:
        def __init__(self, point_id, host):
            self.point_id, self.topology, self.telemetry = point_id, "colloc", Telemetry(host_cpu=host)

    roles = {"VLLM::EngineCore": {"processes": 2, "cpu_cores": 2.0, "wait_cores": 0.0, "wait_cores_max": 0.0,
                                  "sibling_busy_frac": 0.35},
             "colloc/OpenAiIngress": {"processes": 1, "cpu_cores": 0.1, "wait_cores": 0.0, "wait_cores_max": 0.0,
                                      "sibling_busy_frac": 0.9}}
    text = _host_cpu_text([Point("c4", {"roles": roles, "steal_cores": 0.12, "steal_cores_max": 0.4}),
                           Point("c8", {"roles": roles, "steal_cores": 0.005}),
                           Point("c16", {"roles": {}, "steal_cores": 0.3, "steal_cores_max": 0.5}),
                           Point("c32", {"roles": {}, "steal_cores": 0.0})])
    assert "c4: VLLM::EngineCore×2 2.00 / 0.00 (max 0.00), OpenAiIngress×1 0.10 / 0.00 (max 0.00), " \
           "steal 0.12 cores (max 0.40), engine CPU&#x27;s SMT sibling busy in 35% of intervals" in text
    assert "c8: VLLM::EngineCore×2 2.00 / 0.00 (max 0.00), OpenAiIngress×1 0.10 / 0.00 (max 0.00), engine" in text
    assert "c16: steal 0.30 cores (max 0.50)" in text and "c32" not in text


@pytest.mark.skipif(not HostCpuSampler.available(), reason="no /proc on this machine")
def test_real_proc_finds_a_busy_serving_process():
    """A real child whose title starts with VLLM:: (python's argv[0] set by exec -a) and spins."""
    code = "import time\nt=time.time()\nwhile time.time()-t<30: pass"
    child = subprocess.Popen(["bash", "-c", f'exec -a VLLM::EngineCore {sys.executable} -c "$0"', code])
    try:
        s = HostCpuSampler()
        deadline = time.monotonic() + 10
        while child.pid not in s.titles and time.monotonic() < deadline:
            s.titles.clear()
            s.discover()
        assert s.titles.get(child.pid) == "VLLM::EngineCore"
        s.t0 = time.monotonic()  # discovered above: sample() reads, it does not search again
        s.sample()
        while s.series[child.pid][-1][1] - s.series[child.pid][0][1] < 0.2 and time.monotonic() < deadline + 20:
            s.sample()  # until the child has burnt 0.2 CPU-s between the first and the last sample
        r = s.result()
        got = r["processes"][str(child.pid)]
        assert got["role"] == "VLLM::EngineCore" and got["cpu_cores"] > 0.1
        assert got["cpus_seen"] and set(got["cpus_seen"]) <= set(range(os.cpu_count() or 1))
        assert "steal_cores" in r and "steal_cores_max" in r
        if (Path("/proc/stat")).exists():
            assert r["steal_cores"] is not None and r["steal_cores"] >= 0
    finally:
        child.kill()
        child.wait()
