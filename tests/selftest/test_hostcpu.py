"""The host-CPU sampler of serving processes (pdperf.loadgen.hostcpu).

A fake /proc tree stands in for the processes of a GPU host (engine cores, Ray replicas, a
`vllm serve`, an unrelated python); its counters are advanced between samples, so the cores
busy and waiting are known. The real /proc of this machine checks the reading itself: a child
process with a serving title that burns CPU is found and shows busy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdperf.loadgen.hostcpu import CLOCK_TICKS, HostCpuSampler, role_of, serving_title
from pdperf.loadgen.telemetry import TelemetryWindow

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

    def set(self, pid: int, *, cpu_s: float, wait_s: list[float]) -> None:
        d = self.root / str(pid)
        ticks = int(round(cpu_s * CLOCK_TICKS))
        # comm with a space and a parenthesis, as a process title can have; utime and stime split
        (d / "stat").write_text(f"{pid} (VLLM::Engine (x)) S {self.ppid[pid]} 1 1 0 -1 0 0 0 0 0 {ticks // 2} "
                                f"{ticks - ticks // 2} "
                                "0 0 20 0 1 0 0 0 0")
        for t, w in zip(sorted((d / "task").iterdir()), wait_s):
            (t / "schedstat").write_text(f"123 {int(w * 1e9)} 7\n")


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


def test_busy_and_waiting_cores_per_role(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(101, ["VLLM::EngineCore"])
    proc.add(201, ["VLLM::EngineCore"])
    proc.add(301, ["ray::ServeReplica:app:OpenAiIngress"], threads=1)
    proc.add(401, ["/usr/bin/python3", "-m", "pytest"])  # not a serving process
    proc.add(501, ["ray::ServeReplica:pd:Decode:pd"], threads=1)
    proc.add(502, ["/usr/bin/python3", "-c", "spawn"], threads=1, ppid=501)  # an unnamed process between
    proc.add(503, ["VLLM::EngineCore"], threads=1, ppid=502)  # the decode replica's engine
    s = HostCpuSampler(proc_root=proc.root, clock=clock)
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
    assert r["series_fields"] == ["t_s", "cpu_s", "runqueue_wait_s"] and len(r["series"]["101"]) == 3
    assert r["runqueue_wait"] == "available" and r["sampler_cpu_s"] >= 0


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
    assert window.result()["host_cpu"]["roles"]["VLLM::EngineCore"]["cpu_cores"] == pytest.approx(1.0, abs=0.02)


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
        got = s.result()["processes"][str(child.pid)]
        assert got["role"] == "VLLM::EngineCore" and got["cpu_cores"] > 0.1
    finally:
        child.kill()
        child.wait()
