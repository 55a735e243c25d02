"""A small discrete-event simulator of the engines :mod:`pdperf.planner.costs` describes.

Why it exists: the analytic model (:mod:`pdperf.planner.model`) makes approximations (queue
waits from M/D/k formulas, a decode batch from Little's law, a fluid knee where the KV cache
fills). Those approximations are checked here, against an exact simulation of the same
engines with the same known service times: the planner's tests require the two to agree
within a few percent on TTFT, TPOT and throughput, closed and open loop, collocated and PD.
The simulator is not a model of vLLM beyond what ``SystemCosts`` says, and it is not fitted
to anything.

What it simulates, step by step as vLLM's scheduler does:

- requests pay ``overhead_s`` plus an exponential ``jitter_s`` before reaching an engine;
- routing joins the engine of the role with the fewest outstanding requests (Ray Serve's
  power-of-two-choices router is this for two replicas and close to it beyond);
- a PD prefill engine serves prompts first come first served, one at a time; the KV transfer
  is a pure delay; the decode engine admits arrivals at its next step boundary while the KV
  they hold fits, and each step emits one token for every running sequence (the first token
  of a request comes from its first decode step);
- a collocated engine's step holds every running sequence's decode token plus up to
  ``chunk_tokens - batch`` prompt tokens, first come first served (chunked prefill); the step
  that finishes a prompt emits its first token;
- closed loop: ``concurrency`` slots start together at time 0 and each sends its next
  request when the previous one ends, until ``requests`` have been sent (``vllm bench serve
  --max-concurrency``); open loop: Poisson arrivals at ``rate``.

Times are in seconds; everything is deterministic for a given seed.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from pdperf.planner.costs import RoleCosts, SystemCosts


@dataclass
class _Req:
    index: int
    scheduled: float
    isl: int
    osl: int
    prefill_left: int = 0
    started_prefill: bool = False
    emitted: int = 0
    first: float = math.nan
    end: float = math.nan
    slot: int = -1


class _Engine:
    """One engine's state; ``kind`` is 'prefill' (FCFS prompts), 'decode' or 'collocated' (steps)."""

    def __init__(self, costs: RoleCosts, kind: str) -> None:
        self.costs = costs
        self.kind = kind
        self.waiting: deque[_Req] = deque()  # arrived, not admitted (KV full) / not started (prefill)
        self.prefilling: deque[_Req] = deque()  # collocated: admitted, prompt not done
        self.running: list[_Req] = []
        self.busy = False
        self.kv_tokens = 0.0
        self.in_step_prefill_done: list[_Req] = []
        self.saturated_time = 0.0
        self.batch_time = 0.0  # integral of running batch size over time
        self.last_assigned = -1.0

    @property
    def outstanding(self) -> int:
        in_service = 1 if self.kind == "prefill" and self.busy else 0
        return len(self.waiting) + len(self.prefilling) + len(self.running) + in_service


@dataclass(frozen=True)
class SimSummary:
    """Summary of simulated requests (ms; output tokens per second)."""

    requests: int
    med_ttft_ms: float
    mean_ttft_ms: float
    p99_ttft_ms: float
    med_tpot_ms: float
    mean_tpot_ms: float
    p99_tpot_ms: float
    out_tok_s: float


@dataclass(frozen=True)
class SimResult:
    """Every simulated request's times (s) and the run's wall time."""

    scheduled_s: np.ndarray
    first_token_s: np.ndarray
    end_s: np.ndarray
    output_tokens: np.ndarray
    duration_s: float
    mean_decode_batch: float  # time-average running batch per decoding engine

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.scheduled_s

    @property
    def tpot_s(self) -> np.ndarray:
        return (self.end_s - self.first_token_s) / np.maximum(self.output_tokens - 1, 1)

    def summary(self) -> SimSummary:
        """The whole run, as ``vllm bench serve`` reports it (throughput = tokens / wall time)."""
        return _summarize(self.ttft_s, self.tpot_s, float(self.output_tokens.sum()) / self.duration_s)

    @property
    def arrival_rate(self) -> float:
        """Requests per second actually sent (an open loop's Poisson draws miss the nominal rate)."""
        span = float(self.scheduled_s.max() - self.scheduled_s.min())
        return (len(self.scheduled_s) - 1) / span if span > 0 else math.nan

    def steady_summary(self, skip_fraction: float = 0.2) -> SimSummary:
        """Steady state only: requests sent between the first and the last ``skip_fraction`` of the
        run (chosen by send time, so slow ones are not dropped); throughput from completions there."""
        t0 = float(self.scheduled_s.min()) + skip_fraction * self.duration_s
        t1 = float(self.scheduled_s.min()) + (1 - skip_fraction) * self.duration_s
        keep = (self.scheduled_s >= t0) & (self.scheduled_s <= t1)
        done = (self.end_s > t0) & (self.end_s <= t1)
        if keep.sum() < 10:
            raise ValueError(f"steady_summary: only {int(keep.sum())} requests in the window; simulate more")
        tok_s = float(self.output_tokens[done].sum()) / (t1 - t0)
        return _summarize(self.ttft_s[keep], self.tpot_s[keep], tok_s)


def _summarize(ttft: np.ndarray, tpot: np.ndarray, tok_s: float) -> SimSummary:
    return SimSummary(requests=len(ttft), med_ttft_ms=float(np.median(ttft)) * 1e3,
                      mean_ttft_ms=float(np.mean(ttft)) * 1e3, p99_ttft_ms=float(np.percentile(ttft, 99)) * 1e3,
                      med_tpot_ms=float(np.median(tpot)) * 1e3, mean_tpot_ms=float(np.mean(tpot)) * 1e3,
                      p99_tpot_ms=float(np.percentile(tpot, 99)) * 1e3, out_tok_s=tok_s)


class _Sim:
    def __init__(self, costs: SystemCosts, isl: int, osl: int, seed: int) -> None:
        self.costs = costs
        self.isl, self.osl = isl, osl
        self.rng = np.random.default_rng(seed)
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.now = 0.0
        self.done: list[_Req] = []
        if costs.kind == "collocated":
            self.front = [_Engine(costs.prefill, "collocated") for _ in range(costs.prefill.engines)]
            self.back: list[_Engine] = []
        else:
            assert costs.decode is not None
            self.front = [_Engine(costs.prefill, "prefill") for _ in range(costs.prefill.engines)]
            self.back = [_Engine(costs.decode, "decode") for _ in range(costs.decode.engines)]
        # closed loop: callback(req) that sends the slot's next request
        self.on_finish: Callable[[_Req], None] | None = None

    def push(self, t: float, kind: str, obj: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, obj))

    def send(self, req: _Req) -> None:
        delay = self.costs.overhead_s
        if self.costs.jitter_s > 0:
            delay += float(self.rng.exponential(self.costs.jitter_s))
        self.push(req.scheduled + delay, "enter", req)

    @staticmethod
    def route(engines: list[_Engine], now: float) -> _Engine:
        best = min(engines, key=lambda e: (e.outstanding, e.last_assigned))
        best.last_assigned = now
        return best

    # --- engines -------------------------------------------------------------------------------
    def enter(self, req: _Req) -> None:
        eng = self.route(self.front, self.now)
        req.prefill_left = req.isl
        eng.waiting.append(req)
        if not eng.busy:
            self.start(eng)

    def start(self, eng: _Engine) -> None:
        if eng.kind == "prefill":
            if not eng.waiting:
                eng.busy = False
                return
            req = eng.waiting.popleft()
            eng.busy = True
            self.push(self.now + eng.costs.prefill_s(req.isl), "prefill_done", (eng, req))
            return
        c = eng.costs
        # admission: the KV the request needs for its prompt must fit (first come first served)
        while eng.waiting and (eng.kv_tokens + eng.waiting[0].isl <= c.kv_capacity_tokens
                               or (not eng.running and not eng.prefilling)):
            req = eng.waiting.popleft()
            eng.kv_tokens += req.isl
            if eng.kind == "collocated":
                eng.prefilling.append(req)
            else:
                eng.running.append(req)
        if not eng.running and not eng.prefilling:
            eng.busy = False
            return
        eng.busy = True
        t = c.step_s
        for r in eng.running:
            t += c.per_seq_s + c.per_seq_s_per_token * (r.isl + r.emitted)
        eng.in_step_prefill_done = []
        if eng.kind == "collocated":
            budget = c.chunk_tokens - len(eng.running)
            for r in eng.prefilling:
                if budget <= 0:
                    break
                take = min(budget, r.prefill_left)
                if not r.started_prefill:
                    r.started_prefill = True
                    t += c.prefill_s_per_request
                t += c.prefill_s_per_token * take
                r.prefill_left -= take
                budget -= take
                if r.prefill_left == 0:
                    eng.in_step_prefill_done.append(r)
        if eng.waiting:
            t *= c.saturation_penalty
            eng.saturated_time += t
        eng.batch_time += t * len(eng.running)
        self.push(self.now + t, "step_done", eng)

    def step_done(self, eng: _Engine) -> None:
        now = self.now
        still: list[_Req] = []
        for r in eng.running:
            r.emitted += 1
            eng.kv_tokens += 1
            if r.emitted == 1:
                r.first = now
            if r.emitted >= r.osl:
                eng.kv_tokens -= r.isl + r.emitted
                self.finish(r)
            else:
                still.append(r)
        eng.running = still
        for r in eng.in_step_prefill_done:
            eng.prefilling.remove(r)
            r.emitted = 1
            r.first = now
            eng.kv_tokens += 1
            if r.osl <= 1:
                eng.kv_tokens -= r.isl + 1
                self.finish(r)
            else:
                eng.running.append(r)
        eng.in_step_prefill_done = []
        self.start(eng)

    def prefill_done(self, eng: _Engine, req: _Req) -> None:
        self.push(self.now + self.costs.kv_transfer_s(req.isl), "decode_arrive", req)
        self.start(eng)

    def decode_arrive(self, req: _Req) -> None:
        eng = self.route(self.back, self.now)
        eng.waiting.append(req)
        if not eng.busy:
            self.start(eng)

    def finish(self, req: _Req) -> None:
        req.end = self.now
        self.done.append(req)
        if self.on_finish is not None:
            self.on_finish(req)

    def run(self) -> None:
        handlers = {"enter": self.enter, "step_done": self.step_done, "decode_arrive": self.decode_arrive}
        while self.events:
            t, _, kind, obj = heapq.heappop(self.events)
            self.now = t
            if kind == "prefill_done":
                eng, req = cast("tuple[_Engine, _Req]", obj)
                self.prefill_done(eng, req)
            elif kind == "send":
                self.send(obj)  # type: ignore[arg-type]
            else:
                handlers[kind](obj)  # type: ignore[operator]


def simulate(costs: SystemCosts, *, isl: int, osl: int, load: Literal["concurrency", "rate"], value: float,
             requests: int, seed: int = 0) -> SimResult:
    """Simulate ``requests`` requests of ``isl`` prompt and ``osl`` output tokens.

    ``load="concurrency"``: ``value`` slots start at time 0 (closed loop, no think time);
    ``load="rate"``: Poisson arrivals at ``value`` requests per second (open loop).
    """
    if osl < 1 or isl < 1:
        raise ValueError(f"simulate: isl and osl must be >= 1 (got isl {isl}, osl {osl})")
    if requests < 1 or value <= 0:
        raise ValueError(f"simulate: need requests >= 1 and a load > 0 (got {requests}, {value})")
    sim = _Sim(costs, isl, osl, seed)
    made = 0

    def new(t: float, slot: int = -1) -> None:
        nonlocal made
        req = _Req(index=made, scheduled=t, isl=isl, osl=osl, slot=slot)
        made += 1
        sim.push(t, "send", req)

    if load == "concurrency":
        slots = int(value)
        if slots != value or slots < 1:
            raise ValueError(f"simulate: concurrency must be a whole number >= 1 (got {value})")

        def next_request(req: _Req) -> None:
            if made < requests:
                new(sim.now, req.slot)

        sim.on_finish = next_request
        for s in range(min(slots, requests)):
            new(0.0, s)
    elif load == "rate":
        gaps = sim.rng.exponential(1.0 / value, size=requests)
        for t in np.cumsum(gaps) - gaps[0]:
            new(float(t))
    else:
        raise ValueError(f"simulate: load must be 'concurrency' or 'rate' (got {load!r})")
    sim.run()
    done = sorted(sim.done, key=lambda r: r.index)
    scheduled = np.array([r.scheduled for r in done])
    first = np.array([r.first for r in done])
    end = np.array([r.end for r in done])
    duration = float(end.max() - scheduled.min())
    decoders = sim.back or sim.front
    mean_batch = sum(e.batch_time for e in decoders) / len(decoders) / duration
    return SimResult(scheduled_s=scheduled, first_token_s=first, end_s=end,
                     output_tokens=np.array([r.osl for r in done]), duration_s=duration,
                     mean_decode_batch=mean_batch)
