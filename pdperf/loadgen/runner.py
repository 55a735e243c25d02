"""One load point, end to end: prompts, cache control, load, telemetry, client cost -> PointResult.

Why the pieces are arranged like this:

- **The client runs in its own process(es) by default.** ``processes=N`` (N >= 1) spawns N
  fresh worker processes, each with its own event loop (uvloop when installed) and its share
  of the concurrency or rate, away from the caller's threads, GC and imports (a pytest
  process holding a Ray driver is a noisy place to time streams). ``processes=0`` runs in the
  calling process (unit tests, debugging).
- **One clock for all of them.** ``time.perf_counter()`` is ``clock_gettime(CLOCK_MONOTONIC)``
  on Linux: system-wide, so timestamps from different processes on one host are directly
  comparable (checked by a self-test). The parent picks a common start ``t0`` a little in the
  future, every worker schedules relative to it, and records are merged as they are.
- **Warm-up is its own phase**, at the same load, before the measured window: it warms the
  server and the connection pool, then the measured phase starts at a fresh ``t0``. Warm-up
  records are kept (``warmup=True``) and excluded by ``pdperf.metrics``.
- **Telemetry brackets exactly the measured phase**: scrape, run, scrape; KV-cache gauges are
  sampled in between by the parent (text only; parsed afterwards).
- **The client measures itself.** CPU seconds of the measured phase (``getrusage`` of each
  worker, plus the parent's coordinating thread) go to ``PointResult.client`` with event-loop
  lag; a saturated client or a lagging loop is flagged, because its timestamps would be late.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import resource
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

from pdperf.errors import PdperfError
from pdperf.loadgen.client import (
    Api,
    ClientStats,
    LoopLag,
    LoopLagMonitor,
    PreparedRequest,
    StreamingClient,
    arrival_offsets_s,
    build_body,
    run_closed_loop,
    run_open_loop,
)
from pdperf.loadgen.datasets import build_workload_prompts
from pdperf.loadgen.hostcpu import HostCpuSampler
from pdperf.loadgen.telemetry import GpuSampler, TelemetryWindow
from pdperf.metrics import summarize
from pdperf.results import ClientReport, Environment, PointResult, RequestRecord, Telemetry
from pdperf.specs import Workload

# Advisory thresholds for the client's own health (flags, not gates). A worker busy more than
# this share of one core may be late reading sockets; a loop that wakes this late delays every
# chunk timestamp by about as much, which shows up as ITL and TTFT.
CLIENT_CPU_SATURATION = 0.85
LOOP_LAG_P99_MS_LIMIT = 5.0
START_LEAD_S = 0.25  # t0 is this far in the future when the "go" is sent to workers
WORKER_START_TIMEOUT_S = 120.0
TELEMETRY_INTERVAL_S = 1.0
# File descriptors a load process holds besides its streams' sockets: the interpreter's own,
# the pipes to the parent, the event loop's epoll and wake-up pipe, telemetry scrapes.
FD_HEADROOM = 64


def _thread_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def _process_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _run_interruptibly(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    """``loop.run_until_complete(coro)``, where Ctrl-C cancels ``coro`` and is raised as
    KeyboardInterrupt once it has unwound (its client closed, its tasks ended). Raised wherever the
    signal lands, the interrupt tears through the loop's tasks ("Task was destroyed but it is
    pending"), and on CPython 3.11 one that lands inside a compile() leaves the interpreter's AST
    state broken, so pytest's own report of the interrupt then fails (SystemError: AST constructor
    recursion depth mismatch) and the run ends with status 1 instead of 2 (interrupted)."""
    main = loop.create_task(coro)
    interrupted: list[bool] = []

    def on_sigint() -> None:
        interrupted.append(True)
        main.cancel()

    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: the default behaviour
        installed = False
    try:
        return loop.run_until_complete(main)
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)


def _uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------
# The load plan and its shares
# --------------------------------------------------------------------------------------------

@dataclass
class Share:
    """What one worker runs: its requests, and its part of the concurrency or arrival process."""

    worker: int
    base_url: str
    api: Api
    timeout_s: float
    kind: str  # "concurrency" | "rate"
    concurrency: int  # closed loop: this worker's slots
    max_concurrency: int | None  # open loop: this worker's cap
    warmup: list[PreparedRequest] = field(default_factory=list)
    warmup_offsets_s: list[float] = field(default_factory=list)
    measured: list[PreparedRequest] = field(default_factory=list)
    measured_offsets_s: list[float] = field(default_factory=list)
    lag_interval_s: float = 0.025  # 40 wake-ups a second: enough to see stalls, ~0.1 % of a core
    idle_timeout_s: float | None = None  # the workload's stream_idle_timeout_s (StallWatch)


def _split_counts(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def plan_shares(*, base_url: str, api: Api, timeout_s: float, kind: str, point: float, processes: int,
                warmup: Sequence[PreparedRequest], measured: Sequence[PreparedRequest],
                arrival: str = "poisson", burstiness: float = 1.0, max_concurrency: int | None = None,
                seed: int = 0, idle_timeout_s: float | None = None) -> list[Share]:
    """Split one point across ``processes`` workers (at least one; fewer if there is less work).

    Closed loop: slots split as evenly as possible and requests in proportion to slots.
    Open loop: one global arrival process (seeded) dealt round-robin, so the merged stream
    is exactly the planned one; a cap is split like slots (each worker enforces its part).
    """
    n_workers = max(1, processes)
    if kind == "concurrency":
        conc = int(point)
        n_workers = max(1, min(n_workers, conc))
        slots = _split_counts(conc, n_workers)
        w_counts = [round(len(warmup) * s / conc) for s in slots]
        m_counts = [round(len(measured) * s / conc) for s in slots]
        w_counts[-1] = len(warmup) - sum(w_counts[:-1])
        m_counts[-1] = len(measured) - sum(m_counts[:-1])
        shares, wi, mi = [], 0, 0
        for k in range(n_workers):
            shares.append(Share(worker=k, base_url=base_url, api=api, timeout_s=timeout_s, kind=kind,
                                concurrency=slots[k], max_concurrency=None, idle_timeout_s=idle_timeout_s,
                                warmup=list(warmup[wi:wi + w_counts[k]]), measured=list(measured[mi:mi + m_counts[k]])))
            wi += w_counts[k]
            mi += m_counts[k]
        return shares
    if kind != "rate":
        raise ValueError(f"load kind '{kind}': use 'concurrency' or 'rate'")
    if max_concurrency is not None:
        n_workers = max(1, min(n_workers, max_concurrency))
    caps = _split_counts(max_concurrency, n_workers) if max_concurrency else [None] * n_workers
    shape = burstiness if arrival == "gamma" else 1.0
    w_off = arrival_offsets_s(len(warmup), point, burstiness=shape, seed=seed + 1)
    m_off = arrival_offsets_s(len(measured), point, burstiness=shape, seed=seed)
    shares = [Share(worker=k, base_url=base_url, api=api, timeout_s=timeout_s, kind=kind, concurrency=0,
                    max_concurrency=caps[k], idle_timeout_s=idle_timeout_s) for k in range(n_workers)]
    for i, r in enumerate(warmup):
        shares[i % n_workers].warmup.append(r)
        shares[i % n_workers].warmup_offsets_s.append(float(w_off[i]))
    for i, r in enumerate(measured):
        shares[i % n_workers].measured.append(r)
        shares[i % n_workers].measured_offsets_s.append(float(m_off[i]))
    return shares


async def run_share_phase(client: StreamingClient, share: Share, phase: str, t0_s: float,
                          stop_at_s: float | None) -> list[RequestRecord]:
    reqs = share.warmup if phase == "warmup" else share.measured
    if not reqs:
        return []
    if share.kind == "concurrency":
        return await run_closed_loop(client, reqs, concurrency=share.concurrency, t0_s=t0_s, stop_at_s=stop_at_s,
                                     worker=share.worker)
    offsets = share.warmup_offsets_s if phase == "warmup" else share.measured_offsets_s
    return await run_open_loop(client, reqs, offsets, t0_s=t0_s, max_concurrency=share.max_concurrency,
                               stop_at_s=stop_at_s, worker=share.worker)


@dataclass
class PhaseOutcome:
    records: list[RequestRecord]
    cpu_s: float
    stats: ClientStats
    loop_lag: LoopLag


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------

def _worker_entry(conn: mpc.Connection, share: Share) -> None:
    loop = _new_loop()
    try:
        loop.run_until_complete(_worker_async(conn, share))
    finally:
        loop.close()
        conn.close()


async def _worker_async(conn: mpc.Connection, share: Share) -> None:
    loop = asyncio.get_running_loop()
    async with StreamingClient(share.base_url, api=share.api, timeout_s=share.timeout_s,
                               idle_timeout_s=share.idle_timeout_s) as client:
        conn.send(("ready", {"pid": os.getpid(), "now_s": time.perf_counter()}))
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg[0] == "exit":
                return
            _, phase, t0_s, stop_at_s = msg
            client.stats = ClientStats()
            lag = LoopLagMonitor(share.lag_interval_s)
            lag.start()
            cpu0 = _process_cpu_s()
            records = await run_share_phase(client, share, phase, t0_s, stop_at_s)
            cpu1 = _process_cpu_s()
            conn.send(("done", PhaseOutcome(records, cpu1 - cpu0, client.stats, await lag.stop())))


class _WorkerPool:
    """Spawned worker processes driven phase by phase over pipes; always reaped."""

    def __init__(self, shares: list[Share]) -> None:
        self.shares = shares
        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[mpc.Connection] = []

    def __enter__(self) -> _WorkerPool:
        try:
            for share in self.shares:
                parent, child = self.ctx.Pipe()
                p = self.ctx.Process(target=_worker_entry, args=(child, share), daemon=True,
                                     name=f"pdperf-loadgen-{share.worker}")
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            self._collect("ready", WORKER_START_TIMEOUT_S, None)
        except BaseException:
            self.close()
            raise
        return self

    def _collect(self, kind: str, timeout_s: float, on_idle) -> list[Any]:
        """Wait for one ``kind`` message from every worker, calling ``on_idle`` between waits."""
        pending = dict(enumerate(self.conns))
        results: list[Any] = [None] * len(self.conns)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"load workers {sorted(pending)}: no '{kind}' within {timeout_s:g} s; "
                                   "the server may hang (raise the workload's request_timeout_s?)")
            wait_s = min(left, TELEMETRY_INTERVAL_S) if on_idle else left
            ready = mpc.wait(list(pending.values()) + [self.procs[k].sentinel for k in pending], timeout=wait_s)
            if not ready and on_idle:
                on_idle()
            for k in list(pending):
                conn = pending[k]
                if conn in ready:
                    try:
                        msg = conn.recv()
                    except EOFError:
                        raise RuntimeError(f"load worker {k} (pid {self.procs[k].pid}) exited with "
                                           f"{self.procs[k].exitcode} during '{kind}'") from None
                    if msg[0] != kind:
                        raise RuntimeError(f"load worker {k}: expected '{kind}', got '{msg[0]}'")
                    results[k] = msg[1]
                    del pending[k]
                elif self.procs[k].sentinel in ready and not conn.poll():
                    raise RuntimeError(f"load worker {k} (pid {self.procs[k].pid}) died with exit code "
                                       f"{self.procs[k].exitcode} during '{kind}'; its stderr is above")
        return results

    def run_phase(self, phase: str, stop_after_s: float | None, timeout_s: float, on_idle=None
                  ) -> tuple[float, list[PhaseOutcome]]:
        t0 = time.perf_counter() + START_LEAD_S
        stop_at = t0 + stop_after_s if stop_after_s else None
        for c in self.conns:
            c.send(("run", phase, t0, stop_at))
        return t0, self._collect("done", timeout_s, on_idle)

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("exit",))
            except (BrokenPipeError, OSError):
                pass  # that worker is already gone
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# In-process (processes=0)
# --------------------------------------------------------------------------------------------

async def _run_inprocess(share: Share, window: TelemetryWindow, stop_after_s: float | None, timeout_s: float,
                         sampling: bool = True) -> tuple[dict[str, tuple[float, PhaseOutcome]], float]:
    out: dict[str, tuple[float, PhaseOutcome]] = {}
    parent_cpu = 0.0
    async with StreamingClient(share.base_url, api=share.api, timeout_s=share.timeout_s,
                               idle_timeout_s=share.idle_timeout_s) as client:
        for phase in ("warmup", "measured"):
            if phase == "warmup" and not share.warmup:
                continue
            if phase == "measured":
                await asyncio.to_thread(window.start)
            client.stats = ClientStats()
            sampler = (asyncio.create_task(_sample_loop(window))
                       if sampling and phase == "measured" and window.active else None)
            lag = LoopLagMonitor(share.lag_interval_s)
            lag.start()
            cpu0 = _thread_cpu_s()
            t0 = time.perf_counter() + 0.02
            stop_at = t0 + stop_after_s if (stop_after_s and phase == "measured") else None
            records = await asyncio.wait_for(run_share_phase(client, share, phase, t0, stop_at), timeout_s)
            cpu1 = _thread_cpu_s()
            lagd = await lag.stop()
            if sampler is not None:
                sampler.cancel()
                try:
                    await sampler
                except asyncio.CancelledError:
                    pass  # the cancellation we asked for
            if phase == "measured":
                await asyncio.to_thread(window.stop)
            out[phase] = (t0, PhaseOutcome(records, cpu1 - cpu0, client.stats, lagd))
    return out, parent_cpu


async def _sample_loop(window: TelemetryWindow) -> None:
    while True:
        await asyncio.sleep(TELEMETRY_INTERVAL_S)
        await asyncio.to_thread(window.sample)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def reset_prefix_cache(base_url: str, model: str, *, timeout_s: float = 30.0) -> str:
    """POST ``/reset_prefix_cache`` (vLLM dev mode; Ray Serve LLM's dev ingress).

    Returns ``"reset"``, ``"unsupported"`` (404/405: the server has no such endpoint; plain
    vLLM needs ``VLLM_SERVER_DEV_MODE=1``) or ``"failed: <why>"``. Never raises: the per-point
    prompt salt already keeps points from hitting each other's cache.
    """
    url = base_url.rstrip("/") + "/reset_prefix_cache"
    req = urllib.request.Request(url, data=json.dumps({"model": model}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return "reset" if resp.status == 200 else f"failed: HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        if e.code in (404, 405):
            return "unsupported"
        return f"failed: HTTP {e.code} {e.read()[:200]!r}"
    except (urllib.error.URLError, OSError) as e:
        return f"failed: {type(e).__name__}: {e}"


def prepare_requests(workload: Workload, *, model: str, tokenizer_path: Path, count: int, warmup: int, salt: str,
                     extra_body: dict[str, Any] | None = None) -> tuple[list[PreparedRequest], list[PreparedRequest]]:
    """Warm-up and measured requests with bodies serialised (before any clock starts)."""
    prompts = build_workload_prompts(workload, tokenizer_path, warmup + count, salt=salt)
    reqs = [PreparedRequest(index=i, body=build_body(model=model, prompt=p.text, max_tokens=p.output_tokens,
                                                     api=workload.api, temperature=workload.temperature,
                                                     per_chunk_usage=workload.per_chunk_usage, extra=extra_body),
                            input_tokens=p.input_tokens, output_tokens=p.output_tokens, warmup=i < warmup)
            for i, p in enumerate(prompts)]
    return reqs[:warmup], reqs[warmup:]


def request_options(workload: Workload) -> dict[str, Any]:
    """What a point's requests asked of the server beyond the prompt and lengths (recorded with it)."""
    return {"temperature": workload.temperature, "per_chunk_usage": workload.per_chunk_usage}


def run_point(*, base_url: str, model: str, tokenizer_path: Path, workload: Workload, point: float, topology: str,
              gpus: int, metrics_urls: Sequence[str] = (), environment: dict | None = None, processes: int = 1,
              reset_cache: bool = True, salt: str | None = None, extra_body: dict[str, Any] | None = None,
              telemetry_sampling: bool = True) -> PointResult:
    """Run one load point of ``workload`` against ``base_url`` and return its :class:`PointResult`.

    ``point`` is a concurrency (closed loop) or a rate in req/s (open loop), per
    ``workload.sweep.kind``. ``processes``: worker processes (0 = in this process).
    ``metrics_urls``: the engines' ``/metrics`` (loopback or cluster-internal URLs), scraped
    before and after the measured phase and, with ``telemetry_sampling``, once a second during it
    (KV-cache gauges, GPU clocks, host CPU).
    """
    sweep = workload.sweep
    n = sweep.requests_at(point)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    salt = salt if salt is not None else secrets.token_hex(3)
    t_build = time.perf_counter()
    warm, measured = prepare_requests(workload, model=model, tokenizer_path=tokenizer_path, count=n,
                                      warmup=sweep.warmup_requests, salt=salt, extra_body=extra_body)
    prompt_build_s = time.perf_counter() - t_build
    shares = plan_shares(base_url=base_url, api=workload.api, timeout_s=workload.request_timeout_s, kind=sweep.kind,
                         point=point, processes=max(processes, 1), warmup=warm, measured=measured,
                         arrival=sweep.arrival, burstiness=sweep.burstiness, max_concurrency=sweep.max_concurrency,
                         seed=workload.seed, idle_timeout_s=workload.stream_idle_timeout_s)
    ensure_socket_limit(shares, point=point)  # before the first request: the cache reset
    cache_reset = reset_prefix_cache(base_url, model) if reset_cache else "skipped"
    # GPU clocks, power and temperature alongside, where this host has GPUs and the point runs on GPUs
    gpu = GpuSampler() if (environment or {}).get("gpus") and GpuSampler.available() else None
    # and the CPU this host's serving processes used and waited for (pdperf.loadgen.hostcpu)
    host = HostCpuSampler() if HostCpuSampler.available() else None
    window = TelemetryWindow(metrics_urls, gpu=gpu, host=host)
    phase_timeout_s = _phase_timeout_s(shares, workload.request_timeout_s, sweep.max_duration_s)
    if processes <= 0:
        loop = _new_loop()
        try:
            phases, parent_cpu = _run_interruptibly(
                loop, _run_inprocess(shares[0], window, sweep.max_duration_s, phase_timeout_s, telemetry_sampling))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        outcomes = [phases["measured"][1]]
        warm_outcomes = [phases["warmup"][1]] if "warmup" in phases else []
    else:
        with _WorkerPool(shares) as pool:
            warm_outcomes = []
            if warm:
                _, warm_outcomes = pool.run_phase("warmup", None, phase_timeout_s)
            window.start()
            cpu0 = _thread_cpu_s()
            _, outcomes = pool.run_phase("measured", sweep.max_duration_s, phase_timeout_s,
                                         on_idle=window.sample if telemetry_sampling else None)
            parent_cpu = _thread_cpu_s() - cpu0
            window.stop()
    return assemble_point(workload=workload, point=point, topology=topology, gpus=gpus, started_at=started_at,
                          warm_outcomes=warm_outcomes, outcomes=outcomes, parent_cpu_s=parent_cpu,
                          processes=processes, telemetry=window.result(), environment=environment or {},
                          extra_client={"salt": salt, "prefix_cache_reset": cache_reset,
                                        "prompt_build_s": prompt_build_s,
                                        "request_options": request_options(workload)})


def ensure_socket_limit(shares: Sequence[Share], *, point: float) -> None:
    """Make sure each load process may open a socket per stream of its share, before anything is sent.

    Every in-flight stream holds a socket, and a process may open only RLIMIT_NOFILE files (1024
    soft by default on many distributions): past it, connects fail with EMFILE, or a spawned worker
    dies importing a module, minutes into a point. So the soft limit is raised to the hard limit
    when the point needs more (workers inherit it at spawn), and when even the hard limit is too
    low the point fails here, naming the numbers and the fix. An open-loop point without a
    concurrency cap has no known peak (its share's request count bounds it): the limit is raised
    for it, but it is not refused.
    """
    definite = all(s.kind == "concurrency" or s.max_concurrency is not None for s in shares)
    streams = max((s.concurrency if s.kind == "concurrency"
                   else s.max_concurrency or len(s.warmup) + len(s.measured) for s in shares), default=0)
    need = streams + _open_fds() + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard or not definite:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft) if hard == resource.RLIM_INFINITY else hard, hard))
        return
    what = (f"concurrency {int(point)}" if shares[0].kind == "concurrency"
            else f"rate {point:g} req/s capped at {sum(s.max_concurrency or 0 for s in shares)} in flight")
    where = "" if len(shares) == 1 else f" in each of {len(shares)} load processes"
    raise PdperfError(f"{what} needs ~{need} sockets{where}; this process may open {hard} (ulimit -n, its hard "
                      f"limit); raise it with `ulimit -n {1 << (need - 1).bit_length()}` before starting (above the "
                      "hard limit: as root, or in /etc/security/limits.conf)")


def _open_fds() -> int:
    """File descriptors this process holds now (a fixed guess where /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def _phase_timeout_s(shares: Sequence[Share], request_timeout_s: float, max_duration_s: float | None) -> float:
    """A backstop for one phase: the longest a worker's share can take if every request times out."""
    worst = 0.0
    for sh in shares:
        n = max(len(sh.warmup), len(sh.measured))
        if sh.kind == "concurrency":
            waves = -(-n // max(sh.concurrency, 1))
            worst = max(worst, waves * request_timeout_s)
        else:
            last = max(sh.warmup_offsets_s + sh.measured_offsets_s, default=0.0)
            waves = -(-n // sh.max_concurrency) if sh.max_concurrency else 1
            worst = max(worst, last + waves * request_timeout_s)
    if max_duration_s:
        worst = min(worst, max_duration_s + request_timeout_s)
    return worst + START_LEAD_S + 60.0


async def run_point_async(**kwargs: Any) -> PointResult:
    """:func:`run_point` for async callers (runs it in a thread; the load itself is not on your loop)."""
    return await asyncio.to_thread(lambda: run_point(**kwargs))


def assemble_point(*, workload: Workload, point: float, topology: str, gpus: int, started_at: str,
                   warm_outcomes: list[PhaseOutcome], outcomes: list[PhaseOutcome], parent_cpu_s: float,
                   processes: int, telemetry: Telemetry, environment: Environment | dict[str, Any],
                   extra_client: dict[str, Any]) -> PointResult:
    records = [r for o in warm_outcomes for r in o.records] + [r for o in outcomes for r in o.records]
    records.sort(key=lambda r: (not r.warmup, r.index))
    measured = [r for r in records if not r.warmup]
    duration_s = _window_s(measured)
    stats = ClientStats()
    for o in outcomes:
        stats.merge(o.stats)
    cpu_s = sum(o.cpu_s for o in outcomes) + parent_cpu_s
    tokens = sum(r.output_tokens for r in measured)
    lags = [o.loop_lag for o in outcomes]
    lag_p99 = max((x.p99_ms for x in lags if x.p99_ms is not None), default=None)
    lag_max = max((x.max_ms for x in lags if x.max_ms is not None), default=None)
    busiest = max((o.cpu_s for o in outcomes), default=0.0)
    cpu_util = (busiest / duration_s) if duration_s > 0 else None
    client = ClientReport(
        cpu_s=cpu_s, cpu_s_per_1k_tokens=(cpu_s * 1000.0 / tokens) if tokens else None, processes=processes,
        worker_cpu_s=[o.cpu_s for o in outcomes], parent_cpu_s=parent_cpu_s, busiest_worker_cpu_util=cpu_util,
        loop_lag_p99_ms=lag_p99, loop_lag_max_ms=lag_max, token_accounting=dict(stats.accounting),
        output_length_mismatch=stats.output_length_mismatch, input_length_mismatch=stats.input_length_mismatch,
        clock="time.perf_counter (CLOCK_MONOTONIC, system-wide on Linux)",
        event_loop="uvloop" if _uvloop_available() else "asyncio", aiohttp=aiohttp.__version__, **extra_client)
    flags: list[str] = []
    if cpu_util is not None and cpu_util > CLIENT_CPU_SATURATION:
        flags.append("client_cpu_saturated")
    if lag_p99 is not None and lag_p99 > LOOP_LAG_P99_MS_LIMIT:
        flags.append("client_loop_lag")
    if stats.output_length_mismatch:
        flags.append("output_length_mismatch")
    if stats.input_length_mismatch:
        flags.append("input_length_mismatch")
    failed = sum(1 for r in measured if not r.ok)
    if failed:
        flags.append(f"requests_failed:{failed}")
    if telemetry.counter_resets:
        flags.append("telemetry_counter_reset")
    if telemetry.scrape_errors:
        flags.append("telemetry_scrape_failed")
    sweep = workload.sweep
    summary = summarize(records, duration_s=duration_s, gpus=gpus, slos=workload.slos,
                        error_budget=workload.error_budget)
    return PointResult(
        topology=topology, workload=workload.name, point_id=sweep.point_id(point), sweep_kind=sweep.kind,
        point_value=float(point), gpus=gpus, started_at=started_at, duration_s=duration_s, records=records,
        summary=summary, telemetry=telemetry,
        environment=Environment.model_validate(environment) if isinstance(environment, dict) else environment,
        flags=flags, client=client)


def _window_s(measured: Sequence[RequestRecord]) -> float:
    """First measured scheduled send to last measured end (a failed request's last sign of life)."""
    if not measured:
        return 0.0
    start = min(r.scheduled_s for r in measured)
    ends = [r.end_s if r.end_s is not None else (r.sent_s if r.sent_s is not None else r.scheduled_s)
            for r in measured]
    return max(max(ends) - start, 0.0)


async def single_request_async(base_url: str, model: str, prompt: str, max_tokens: int, api: Api = "completions",
                               *, timeout_s: float = 300.0, extra_body: dict[str, Any] | None = None
                               ) -> tuple[RequestRecord, str]:
    """One streamed request (greedy, ``ignore_eos``), its record and the generated text."""
    body = build_body(model=model, prompt=prompt, max_tokens=max_tokens, api=api, extra=extra_body)
    req = PreparedRequest(index=0, body=body, input_tokens=0, output_tokens=max_tokens)
    async with StreamingClient(base_url, api=api, timeout_s=timeout_s, keep_text=True) as client:
        rec = await client.send(req, time.perf_counter())
        return rec, client.last_text.get(0, "")


def single_request(base_url: str, model: str, prompt: str, max_tokens: int, api: Api = "completions", *,
                   timeout_s: float = 300.0, extra_body: dict[str, Any] | None = None) -> tuple[RequestRecord, str]:
    """Sync :func:`single_request_async` (for smoke tests); from async code await the async one."""
    return asyncio.run(single_request_async(base_url, model, prompt, max_tokens, api, timeout_s=timeout_s,
                                            extra_body=extra_body))


# --------------------------------------------------------------------------------------------
# CLI (benchmarks run the client as a process, the same way they run `vllm bench serve`)
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from pdperf.results import save_point
    from pdperf.specs import Sweep

    ap = argparse.ArgumentParser(prog="python -m pdperf.loadgen.runner",
                                 description="Run one load point and write its PointResult JSON.")
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True, type=Path, help="model folder with tokenizer.json")
    ap.add_argument("--isl", type=int, required=True)
    ap.add_argument("--osl", type=int, required=True)
    ap.add_argument("--dataset", default="random")
    ap.add_argument("--api", default="completions", choices=["completions", "chat"])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--concurrency", type=int)
    g.add_argument("--rate", type=float, help="req/s (open loop, Poisson)")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--metrics-url", action="append", default=[])
    ap.add_argument("--no-cache-reset", action="store_true")
    ap.add_argument("--output", type=Path, help="write the PointResult JSON here (atomically)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="default: the server's (none sent)")
    ap.add_argument("--per-chunk-usage", action="store_true", help="continuous_usage_stats in every chunk")
    ap.add_argument("--no-telemetry-sampling", action="store_true",
                    help="scrape --metrics-url only before and after, not every second during the point")
    args = ap.parse_args(argv)
    kind = "concurrency" if args.concurrency else "rate"
    point = float(args.concurrency or args.rate)
    workload = Workload(name="cli", dataset=args.dataset, isl=args.isl, osl=args.osl, api=args.api, seed=args.seed,
                        temperature=args.temperature, per_chunk_usage=args.per_chunk_usage,
                        sweep=Sweep(kind=kind, points=[point], requests_per_point=args.requests,
                                    warmup_requests=args.warmup, max_concurrency=args.max_concurrency))
    result = run_point(base_url=args.base_url, model=args.model, tokenizer_path=args.tokenizer, workload=workload,
                       point=point, topology="cli", gpus=0, metrics_urls=args.metrics_url, processes=args.processes,
                       reset_cache=not args.no_cache_reset, telemetry_sampling=not args.no_telemetry_sampling)
    if args.output:
        save_point(args.output, result)
    s, c = result.summary, result.client
    print(json.dumps({"requests_ok": s.requests_ok, "errors": s.errors,
                      "ttft_mean_ms": s.stat("ttft_ms", "mean"), "tpot_mean_ms": s.stat("tpot_ms", "mean"),
                      "output_tok_per_s": s.throughput.output_tok_per_s,
                      "client": {"cpu_s": c.cpu_s, "cpu_s_per_1k_tokens": c.cpu_s_per_1k_tokens,
                                 "processes": c.processes, "busiest_worker_cpu_util": c.busiest_worker_cpu_util,
                                 "loop_lag_p99_ms": c.loop_lag_p99_ms},
                      "flags": result.flags}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
