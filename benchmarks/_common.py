"""Shared plumbing of the client benchmarks: a real `vllm serve`, process CPU sampling, ports.

Why here and not in the package: these run the *other* client (`vllm bench serve`) and a real
server for side-by-side comparisons of the load generator; the suite itself never needs them.

- :class:`VllmServer` starts ``vllm serve`` on a free loopback port in its own process group,
  waits for ``/health`` under one deadline while checking the process is alive (no fixed
  sleeps), and kills the whole group on exit, also when start-up fails.
- :class:`CpuSampler` reads ``/proc/<pid>/stat`` of a process tree (the client and any worker
  processes it spawned) so two clients are charged the same way for the same window.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model() -> Path:
    out = subprocess.run([sys.executable, "-m", "pdperf.models", "tiny-llama"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"building the tiny model failed (python -m pdperf.models tiny-llama): {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its live descendants (all threads)."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # fields[11], [12] are utime, stime; [13], [14] cutime, cstime (reaped children)
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(_children(p))
    return total


class CpuSampler:
    """Samples a process tree's CPU seconds with their ``perf_counter`` times, in a thread.

    ``cpu_between(t0, t1)`` interpolates the counter at the window's ends, so a client's
    start-up (imports, tokenizer, dataset) is not charged to its streaming.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), tree_cpu_s(self.pid)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0][0]:
            return s[0][1]
        for (ta, ca), (tb, cb) in zip(s, s[1:]):
            if ta <= t <= tb:
                return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb
        return s[-1][1]

    def cpu_between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)


@dataclass
class ClientRun:
    """A finished client process: exit code, its output lines with arrival times, its CPU samples."""

    returncode: int
    lines: list[tuple[float, str]]
    cpu: CpuSampler
    wall_s: float

    @property
    def stdout(self) -> str:
        return "".join(line for _, line in self.lines)

    def line_time(self, marker: str) -> float | None:
        """perf_counter time at which the first output line containing ``marker`` arrived."""
        return next((t for t, line in self.lines if marker in line), None)

    @property
    def total_cpu_s(self) -> float:
        return self.cpu.samples[-1][1] if self.cpu.samples else 0.0


def run_with_cpu(cmd: list[str], *, env: dict | None = None, timeout_s: float = 900, cwd: Path = ROOT,
                 log: Path | None = None) -> ClientRun:
    """Run a client command to completion, sampling its process tree's CPU and time-stamping
    its output lines as they arrive (``PYTHONUNBUFFERED`` so markers are not held back)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, bufsize=1)
    lines: list[tuple[float, str]] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter(), line))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        with CpuSampler(proc.pid) as sampler:
            proc.wait(timeout=timeout_s)
            sampler.samples.append((time.perf_counter(), sampler.samples[-1][1] if sampler.samples else 0.0))
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        t.join(timeout=10)
        if log:
            Path(log).write_text("".join(line for _, line in lines))
    return ClientRun(proc.returncode, lines, sampler, time.perf_counter() - t_start)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass  # already gone


@dataclass
class VllmServer:
    """``vllm serve <model>`` on a free loopback port: ``with VllmServer(path) as srv: srv.url``."""

    model: Path
    log: Path
    extra_args: tuple[str, ...] = ("--enforce-eager",)
    env: dict | None = None
    startup_timeout_s: float = 300.0
    cpu_list: str | None = None  # e.g. "0": pin the server (taskset) so a client can have the other core

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
               "HF_HUB_OFFLINE": "1", **(self.env or {})}
        cmd = [str(VENV_BIN / "vllm"), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", "tiny", *self.extra_args]
        if self.cpu_list:
            cmd = ["taskset", "-c", self.cpu_list, *cmd]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)
        try:
            self._await_health()
        except BaseException:
            self.close()
            raise
        return self

    def _await_health(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before /health was ready; "
                                   f"log {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass  # not listening yet; the deadline bounds this loop
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve: /health not ready within {self.startup_timeout_s:g} s; "
                                   f"log {self.log}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)  # poll interval

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def close(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
        if getattr(self, "_logf", None):
            self._logf.close()
            self._logf = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def vllm_bench_cmd(*, base_url: str, model_name: str, tokenizer: Path, isl: int, osl: int, n: int,
                   concurrency: int | None = None, rate: float | None = None, result_file: Path,
                   extra: list[str] = ()) -> list[str]:
    """`vllm bench serve` with the random dataset, fixed lengths, results saved as JSON."""
    cmd = [str(VENV_BIN / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", base_url,
           "--endpoint", "/v1/completions", "--model", model_name, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(isl), "--random-output-len", str(osl),
           "--random-range-ratio", "0", "--num-prompts", str(n), "--ignore-eos", "--disable-tqdm",
           "--save-result", "--result-dir", str(result_file.parent), "--result-filename", result_file.name,
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--ready-check-timeout-sec", "0", *extra]
    if concurrency is not None:
        cmd += ["--max-concurrency", str(concurrency), "--request-rate", "inf"]
    if rate is not None:
        cmd += ["--request-rate", str(rate)]
    return cmd


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
