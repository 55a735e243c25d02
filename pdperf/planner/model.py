"""The analytic model: TTFT, TPOT and throughput of a deployment at a load, from its costs.

Why analytic: the planner fits its parameters to measured sweeps (hundreds of model
evaluations per fit, a bootstrap of fits for the uncertainty) and searches hundreds of
configurations, so one prediction must take well under a millisecond. The discrete-event
simulator (:mod:`pdperf.planner.simulate`) runs the same engines exactly and the tests hold
the two within a few percent where this model's assumptions hold; docs/PLANNER.md lists the
assumptions and where they break.

The model, per request:

- **TTFT** = overhead (fixed + mean jitter) + prefill queue wait + prefill + KV transfer
  + (PD) wait to join the decode engine's next step + its first step;
- **TPOT** = the decode step time a request sees: ``step_s + (1 + others) * per-sequence cost``,
  where ``others`` (the mean decode batch besides it) comes from Little's law, and on a
  collocated engine stretched by the share of engine time spent on other requests' prompts;
- **throughput**: open loop, the offered rate (if every stage keeps up); closed loop, the
  ``X`` at which ``X * cycle(X) = concurrency`` (Little's law over the whole loop, no think time).

Queue waits: the PD prefill role is an M/D/k queue (Erlang C with the Allen-Cunneen
factor ``(ca2 + 0) / 2``); in a closed loop the arrivals are smoother than Poisson and
``ca2`` comes from Whitt's QNA hybrid of the loop's own variability and 1. A collocated
engine's prompts are an M/D/1 queue whose service includes the decode part of the steps they
ride in (chunked prefill). In a closed loop, requests prefilled together on a collocated
engine finish together and come back together (a convoy): ``convoy`` (0..1, a profile
parameter) mixes in that synchronised extreme, where a request waits for half of the
engine's other requests' prompts and decodes through only half of them.

The KV cache: a decode (or collocated) engine holds at most ``kv_capacity_tokens`` of
context; at that many running sequences the role is a hard bottleneck (a fluid knee), its
steps cost ``saturation_penalty`` times more, and the rest of the loop waits before its first
token.

The study's protocol (``requests_per_slot``): every slot starts at time 0, so the first
``concurrency`` requests arrive at once (a first wave served back to back), and throughput is
tokens over wall time including that wave and the drain. With 5 requests per slot the wave
is a fifth of the requests and sets p99 TTFT; the model computes the wave's TTFTs explicitly
and mixes them with the steady state's distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pdperf.planner.costs import RoleCosts, SystemCosts

Placement = Literal["pack", "spread", "any"]


@dataclass(frozen=True)
class Deployment:
    """A configuration: collocated engines (``prefill_*`` are the engines), or PD roles."""

    kind: Literal["collocated", "pd"]
    prefill_replicas: int
    prefill_tp: int
    decode_replicas: int = 0
    decode_tp: int = 0
    placement: Placement = "pack"

    def __post_init__(self) -> None:
        if self.prefill_replicas < 1 or self.prefill_tp < 1:
            raise ValueError(f"deployment {self.name}: replicas and TP must be >= 1")
        if self.kind == "pd" and (self.decode_replicas < 1 or self.decode_tp < 1):
            raise ValueError(f"deployment {self.name}: PD needs decode replicas and TP >= 1")
        if self.kind == "collocated" and (self.decode_replicas or self.decode_tp):
            raise ValueError(f"deployment {self.name}: collocated takes no decode role (set decode_* to 0)")

    @classmethod
    def collocated(cls, replicas: int, tp: int) -> Deployment:
        return cls("collocated", replicas, tp)

    @classmethod
    def pd(cls, prefill_replicas: int, prefill_tp: int, decode_replicas: int, decode_tp: int,
           placement: Placement = "pack") -> Deployment:
        return cls("pd", prefill_replicas, prefill_tp, decode_replicas, decode_tp, placement)

    @classmethod
    def from_topology(cls, topology) -> Deployment:  # pdperf.specs.Topology (kept untyped: no import cycle)
        if topology.kind == "collocated":
            return cls.collocated(topology.collocated.replicas, topology.collocated.tp)
        placement: Literal["pack", "spread", "any"] = (topology.placement if topology.placement in ("pack", "spread")
                                                       else "any")
        return cls.pd(topology.prefill.replicas, topology.prefill.tp, topology.decode.replicas, topology.decode.tp,
                      placement)

    @property
    def gpus(self) -> int:
        return self.prefill_replicas * self.prefill_tp + self.decode_replicas * self.decode_tp

    @property
    def name(self) -> str:
        """``colloc-2xtp4`` / ``pd-1p2-3d2-pack``: the names topologies/ uses."""
        if self.kind == "collocated":
            return f"colloc-{self.prefill_replicas}xtp{self.prefill_tp}"
        return (f"pd-{self.prefill_replicas}p{self.prefill_tp}-{self.decode_replicas}d{self.decode_tp}"
                f"-{self.placement}")

    @property
    def label(self) -> str:
        """The study's wording: ``2xTP4`` / ``1P-TP2:3D-TP2``."""
        if self.kind == "collocated":
            return f"{self.prefill_replicas}xTP{self.prefill_tp}"
        return f"{self.prefill_replicas}P-TP{self.prefill_tp}:{self.decode_replicas}D-TP{self.decode_tp}"


@dataclass(frozen=True)
class WorkloadPoint:
    """One load point: request shape and load (closed loop ``concurrency`` or open loop ``rate`` req/s).

    ``requests_per_slot`` (closed loop only) models a finite run as ``vllm bench serve`` makes it:
    ``concurrency`` slots start together and ``requests_per_slot * concurrency`` requests are sent;
    None is the steady state of an endless run.
    """

    isl: int
    osl: int
    load: Literal["concurrency", "rate"]
    value: float
    requests_per_slot: int | None = None

    def __post_init__(self) -> None:
        if self.isl < 1 or self.osl < 1:
            raise ValueError(f"workload point: isl and osl must be >= 1 (got {self.isl}, {self.osl})")
        if self.value <= 0:
            raise ValueError(f"workload point: {self.load} must be > 0 (got {self.value})")
        if self.load == "concurrency" and self.value < 1:
            raise ValueError(f"workload point: concurrency must be >= 1 (got {self.value})")
        if self.requests_per_slot is not None and (self.load != "concurrency" or self.requests_per_slot < 1):
            raise ValueError("workload point: requests_per_slot needs a concurrency load and must be >= 1")

    @property
    def label(self) -> str:
        return f"c{self.value:g}" if self.load == "concurrency" else f"r{self.value:g}"


@dataclass(frozen=True)
class LatencyDistribution:
    """A per-request latency's distribution as the model sees it (ms).

    A share ``wave_weight`` of requests (the first wave of a finite closed-loop run) take one
    of the listed ``wave_ms`` values, equally likely, plus the exponential jitter; the rest are
    ``base_ms`` plus an exponential of mean ``jitter_ms`` plus, with probability ``wait_prob``,
    an exponential wait of mean ``wait_ms`` plus a normal spread of standard deviation ``sd_ms``.
    """

    base_ms: float
    jitter_ms: float = 0.0
    wait_prob: float = 0.0
    wait_ms: float = 0.0
    sd_ms: float = 0.0
    wave_ms: tuple[float, ...] = ()
    wave_weight: float = 0.0

    def _steady_cdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float) - self.base_ms
        m1, m2 = self.jitter_ms, self.wait_ms

        def expo(t: np.ndarray, m: float) -> np.ndarray:
            if m <= 1e-9:
                return (t >= 0).astype(float)
            return np.where(t > 0, 1.0 - np.exp(-np.maximum(t, 0) / m), 0.0)

        def hypo(t: np.ndarray) -> np.ndarray:  # jitter + wait, both exponential
            if m2 <= 1e-9:
                return expo(t, m1)
            if m1 <= 1e-9:
                return expo(t, m2)
            if abs(m1 - m2) < 1e-6 * max(m1, m2):
                m = (m1 + m2) / 2
                tt = np.maximum(t, 0)
                return np.where(t > 0, 1.0 - np.exp(-tt / m) * (1 + tt / m), 0.0)
            tt = np.maximum(t, 0)
            return np.where(t > 0, 1.0 - (m1 * np.exp(-tt / m1) - m2 * np.exp(-tt / m2)) / (m1 - m2), 0.0)

        if self.sd_ms <= 1e-9:
            return (1 - self.wait_prob) * expo(x, m1) + self.wait_prob * hypo(x)
        # a normal spread on top: average the CDF over a few Gauss-Hermite nodes
        nodes, weights = np.polynomial.hermite_e.hermegauss(9)
        weights = weights / weights.sum()
        out = np.zeros_like(x)
        for z, w in zip(nodes, weights):
            t = x - z * self.sd_ms
            out += w * ((1 - self.wait_prob) * expo(t, m1) + self.wait_prob * hypo(t))
        return out

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        x = np.atleast_1d(np.asarray(x, dtype=float))
        steady = self._steady_cdf(x)
        if not self.wave_ms or self.wave_weight <= 0:
            return steady
        t = x[:, None] - np.asarray(self.wave_ms)[None, :]
        if self.jitter_ms > 1e-9:
            wave = np.where(t > 0, 1.0 - np.exp(-np.maximum(t, 0) / self.jitter_ms), 0.0).mean(axis=1)
        else:
            wave = (t >= 0).mean(axis=1)
        return (1 - self.wave_weight) * steady + self.wave_weight * wave

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Quantiles (0..1) from the CDF on a grid, refined once inside each bracket (resolution
        about 1e-5 of the range, far below any measurement's noise)."""
        lo = self.base_ms - 8 * self.sd_ms
        hi = self.base_ms + 40 * (self.jitter_ms + self.wait_ms) + 8 * self.sd_ms + 1e-3
        if self.wave_ms:
            lo = min(lo, min(self.wave_ms))
            hi = max(hi, max(self.wave_ms) + 40 * self.jitter_ms + 1e-3)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return [math.inf for _ in qs]
        xs = np.linspace(lo, hi, 201)
        cdf = self.cdf(xs)
        out = []
        for q in qs:
            i = int(np.searchsorted(cdf, q))
            if i <= 0:
                out.append(float(xs[0]))
                continue
            if i >= len(xs):
                out.append(float(xs[-1]))
                continue
            fine = np.linspace(xs[i - 1], xs[i], 101)
            fc = self.cdf(fine)
            k = min(max(int(np.searchsorted(fc, q)), 1), len(fine) - 1)
            f0, f1 = fc[k - 1], fc[k]
            frac = (q - f0) / (f1 - f0) if f1 > f0 else 1.0
            out.append(float(fine[k - 1] + min(max(frac, 0.0), 1.0) * (fine[k] - fine[k - 1])))
        return out

    def quantile(self, q: float) -> float:
        return self.quantiles([q])[0]

    def mean(self) -> float:
        steady = self.base_ms + self.jitter_ms + self.wait_prob * self.wait_ms
        if not self.wave_ms or self.wave_weight <= 0:
            return steady
        wave = float(np.mean(self.wave_ms)) + self.jitter_ms
        return (1 - self.wave_weight) * steady + self.wave_weight * wave


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for one deployment at one load point (ms, tokens/s, req/s)."""

    deployment: Deployment
    point: WorkloadPoint
    med_ttft_ms: float
    mean_ttft_ms: float
    p99_ttft_ms: float
    med_tpot_ms: float
    p99_tpot_ms: float
    out_tok_s: float
    req_s: float
    prefill_utilization: float  # share of prefill capacity in use (collocated: of engine time)
    decode_batch: float  # mean running sequences per decode (or collocated) engine
    bottleneck: str  # "none" | "prefill" | "decode" | "kv-capacity" | "engine"
    overloaded: bool  # open loop: the offered rate exceeds a stage's capacity
    ttft_dist: LatencyDistribution = field(repr=False)
    tpot_dist: LatencyDistribution = field(repr=False)

    @property
    def gpus(self) -> int:
        return self.deployment.gpus

    @property
    def out_tok_s_per_gpu(self) -> float:
        return self.out_tok_s / self.gpus

    def attainment(self, ttft_ms: float | None = None, tpot_ms: float | None = None) -> float:
        """Share of requests whose own TTFT and TPOT are within the bounds (assumed independent)."""
        if self.overloaded:
            return 0.0
        p = 1.0
        if ttft_ms is not None:
            p *= float(self.ttft_dist.cdf(ttft_ms)[0])
        if tpot_ms is not None:
            p *= float(self.tpot_dist.cdf(tpot_ms)[0])
        return p

    def metric(self, name: str) -> float:
        return float(getattr(self, name))


# --------------------------------------------------------------------------------------------
# queueing pieces


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/k queue (``offered`` = arrival rate x service time)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for j in range(1, servers + 1):
        b = offered * b / (j + offered * b)
    return servers * b / (servers - offered * (1 - b))


def qna_arrival_scv(utilization: float, sources: float, own_scv: float) -> float:
    """Arrival variability of a closed loop's merged streams: Whitt's QNA hybrid of the streams'
    own SCV (asymptotic method) and 1 (Poisson, the stationary-interval method for many streams)."""
    w = 1.0 / (1.0 + 4.0 * (1.0 - min(utilization, 1.0)) ** 2 * max(sources - 1.0, 0.0))
    return w * own_scv + (1.0 - w)


@dataclass
class _State:
    """One evaluation of the loop at throughput X (seconds)."""

    cycle: float
    ttft: float
    tpot: float
    batch: float  # mean running sequences per decoding engine, besides the tagged one
    wait: float  # mean queue wait before the first token
    wait_prob: float
    base: float  # TTFT without queue wait and jitter
    tpot_sd: float
    utilization: float  # PD: prefill role's; collocated: share of engine time on prompts
    decode_load: float  # share of the decode (collocated: whole engine) capacity in use
    wait_scale: float  # time between departures of the queue that makes the wait (s)

    def bottleneck(self, kind: str) -> str:
        if kind == "pd":
            if self.utilization > 0.95:
                return "prefill"
            return "decode" if self.decode_load > 0.95 else "none"
        return "engine" if self.decode_load > 0.95 else "none"


def _kv_slots(role: RoleCosts, isl: int, osl: int) -> float:
    if not math.isfinite(role.kv_capacity_tokens):
        return math.inf
    return max(role.kv_capacity_tokens / (isl + osl / 2.0), 1.0)


def _pd_state(c: SystemCosts, isl: int, osl: int, x: float, n: float | None, capped: bool) -> _State | None:
    p, d = c.prefill, c.decode
    assert d is not None
    closed = n is not None
    n_slots = n if n is not None else 1.0  # the closed loop's concurrency; unused in an open loop
    s = p.prefill_s(isl)
    offered = x * s
    if offered >= p.engines:
        return None
    util = offered / p.engines
    kv = c.kv_transfer_s(isl)
    beta = d.per_seq_at(isl + (osl - 1) / 2.0)
    x_d = x / d.engines
    fin = (n_slots - 1) / n_slots if closed and n_slots > 1 else 1.0
    if capped:
        slots = _kv_slots(d, isl, osl)
        step = (d.step_s + beta * slots) * d.saturation_penalty
        if x_d * osl * step > slots:
            return None
        batch = slots - 1
    else:
        den = 1.0 - beta * x_d * osl * fin
        if den <= 0:
            return None
        step = (d.step_s + beta) / den
        batch = x_d * osl * step * fin
    if closed:
        cycle_guess = n_slots / x if x > 0 else math.inf
        ca2 = qna_arrival_scv(util, n_slots / p.engines, (c.jitter_s / cycle_guess) ** 2 if cycle_guess > 0 else 1.0)
    else:
        ca2 = 1.0
    pw = erlang_c(p.engines, offered)
    wait = pw * s / (p.engines - offered) * ca2 / 2.0 * fin
    step_other = d.step_s + beta * batch
    join = (1.0 - math.exp(-batch)) * step_other / 2.0
    base = c.overhead_s + s + kv + join + step
    ttft = base + c.jitter_s + wait
    decode_load = 1.0 if capped else beta * x_d * osl * fin
    return _State(cycle=ttft + (osl - 1) * step, ttft=ttft, tpot=step, batch=batch, wait=wait,
                  wait_prob=pw if wait > 0 else 0.0, base=base, tpot_sd=0.0, utilization=util,
                  decode_load=decode_load,
                  wait_scale=(osl * step / max(batch + 1, 1) / d.engines) if capped else s / p.engines)


def _colloc_state(c: SystemCosts, isl: int, osl: int, x: float, n: float | None, capped: bool) -> _State | None:
    e = c.prefill
    closed = n is not None
    n_slots = n if n is not None else 1.0  # the closed loop's concurrency; unused in an open loop
    x_e = x / e.engines
    n_e = n_slots / e.engines if closed else 1.0
    convoy = c.convoy if closed else 0.0
    s = e.prefill_s(isl)
    rho = x_e * s
    if rho >= 1:
        return None
    fin = (n_e - 1) / n_e if closed and n_e > 1 else 1.0
    beta = e.per_seq_at(isl + osl / 2.0)
    share = 1.0 - convoy / 2.0  # share of other prompts a decoding request runs through
    if capped:
        slots = _kv_slots(e, isl, osl)
        step_seen = (e.step_s + beta * slots) * e.saturation_penalty
        den = 1.0 - rho * share
        if den <= 0:
            return None
        tpot = step_seen / den
        if x_e * (osl - 1) * tpot > slots:
            return None
        batch = slots - 1
    else:
        den = 1.0 - rho * share - beta * x_e * (osl - 1) * fin
        if den <= 0:
            return None
        tpot = (e.step_s + beta) / den
        batch = x_e * (osl - 1) * tpot * fin
    step_dec = e.step_s + beta * batch
    s_eff = s + isl / max(e.chunk_tokens - batch, 1.0) * step_dec
    rho_eff = x_e * s_eff
    if rho_eff >= 1:
        return None
    random_wait = rho_eff * s_eff / (2.0 * (1.0 - rho_eff)) * fin
    convoy_wait = max(n_e - 1.0, 0.0) / 2.0 * s_eff
    wait = (1 - convoy) * random_wait + convoy * convoy_wait
    join = (1 - rho_eff) * (1.0 - math.exp(-batch)) * step_dec / 2.0
    base = c.overhead_s + s_eff + join
    ttft = base + c.jitter_s + wait
    # a decoding request runs through K other prompts, K ~ Poisson: the spread of its TPOT
    prompts = x_e * share * (osl - 1) * tpot
    tpot_sd = math.sqrt(max(prompts, 0.0)) * s / max(osl - 1, 1)
    return _State(cycle=ttft + (osl - 1) * tpot, ttft=ttft, tpot=tpot, batch=batch, wait=wait,
                  wait_prob=min(rho_eff + convoy, 1.0) if wait > 0 else 0.0, base=base, tpot_sd=tpot_sd,
                  utilization=rho, decode_load=1.0 - den if not capped else 1.0, wait_scale=s_eff)


def _state(c: SystemCosts, isl: int, osl: int, x: float, n: float | None, capped: bool) -> _State | None:
    fn = _pd_state if c.kind == "pd" else _colloc_state
    return fn(c, isl, osl, x, n, capped)


def _over_kv(c: SystemCosts, st: _State, isl: int, osl: int) -> bool:
    role = c.decode if c.kind == "pd" else c.prefill
    assert role is not None
    return st.batch + 1.0 > _kv_slots(role, isl, osl)


def _solve_closed(c: SystemCosts, isl: int, osl: int, n: float) -> tuple[float, _State, str]:
    """Throughput X with X * cycle(X) = n; at a bottleneck, the excess population waits there."""

    def search(capped: bool) -> tuple[float, _State | None]:
        lo, hi = 0.0, None
        st0 = _state(c, isl, osl, 1e-9, n, capped)
        if st0 is None:
            return 0.0, None
        hi = n / st0.cycle * 1.000001  # X can never beat the unloaded cycle
        best = None
        for _ in range(40):
            mid = (lo + hi) / 2
            st = _state(c, isl, osl, mid, n, capped)
            if st is None or mid * st.cycle > n:
                hi = mid
            else:
                lo, best = mid, st
        return lo, best

    x, st = search(False)
    if st is not None and not _over_kv(c, st, isl, osl):
        if x * st.cycle < n * 0.999:  # a stage saturated before the loop filled: everyone else waits
            st = _with_extra_wait(st, n / x - st.cycle)
        return x, st, st.bottleneck(c.kind)
    x, st = search(True)
    if st is None:
        raise ValueError("model: no throughput satisfies the loop even at the KV-capacity limit")
    extra = max(n / x - st.cycle, 0.0)
    return x, _with_extra_wait(st, extra), "kv-capacity"


def _with_extra_wait(st: _State, extra: float) -> _State:
    if extra <= 0:
        return st
    total = st.wait + extra
    return _State(cycle=st.cycle + extra, ttft=st.ttft + extra, tpot=st.tpot, batch=st.batch, wait=total,
                  wait_prob=1.0, base=st.base, tpot_sd=st.tpot_sd, utilization=st.utilization,
                  decode_load=st.decode_load, wait_scale=st.wait_scale)


# --------------------------------------------------------------------------------------------
# the first wave of a finite closed-loop run


def _first_wave(c: SystemCosts, isl: int, osl: int, n: int, steady: _State) -> tuple[list[float], list[float]]:
    """TTFTs (s, without the jitter) and TPOTs (s) of the ``n`` requests that arrive together at time 0."""
    e = c.prefill  # the PD prefill role, or the collocated engines
    s = e.prefill_s(isl)
    per = [n // e.engines + (1 if i < n % e.engines else 0) for i in range(e.engines)]
    if c.kind == "pd":
        # The wave reaches decode one prompt apart. It is not held back at the KV limit: vLLM admits and
        # then preempts, and the study's PD TP2 points at c48/c64 show no first-wave waits of a
        # whole decode lifetime (their p99 TTFT is 2.3 s and 4.3 s against a 5.6 s lifetime).
        arrivals = sorted(c.overhead_s + k * s + c.kv_transfer_s(isl) + steady.tpot
                          for m in per for k in range(1, m + 1))
        return arrivals, [steady.tpot] * len(arrivals)
    beta = e.per_seq_at(isl + osl / 2.0)
    ttft: list[float] = []
    tpot: list[float] = []
    for m in per:
        t = c.overhead_s
        for k in range(m):  # prompts back to back, decode of the k already started riding along
            step_dec = e.step_s + beta * k
            t += s + isl / max(e.chunk_tokens - k, 1.0) * step_dec
            ttft.append(t)
        step_all = e.step_s + beta * max(m - 1, 0)
        for k in range(m):  # request k decodes through the m - 1 - k prompts after it
            later = (m - 1 - k) * s
            tpot.append(step_all + later / max(osl - 1, 1))
    return ttft, tpot


# --------------------------------------------------------------------------------------------


def solve(costs: SystemCosts, point: WorkloadPoint, deployment: Deployment) -> Prediction:
    """The model's prediction for ``deployment`` (whose costs are ``costs``) at ``point``."""
    isl, osl = point.isl, point.osl
    overloaded = False
    if point.load == "rate":
        x = point.value
        st = _state(costs, isl, osl, x, None, False)
        if st is not None:
            bottleneck = st.bottleneck(costs.kind)
        if st is not None and _over_kv(costs, st, isl, osl):
            st = None  # at the KV limit an open loop's queue grows without bound (preemptions)
        if st is None:
            overloaded = True
            cap = _capacity(costs, isl, osl)
            nan = math.inf
            dist = LatencyDistribution(base_ms=math.inf)
            return Prediction(deployment, point, nan, nan, nan, nan, nan, out_tok_s=cap * osl, req_s=cap,
                              prefill_utilization=1.0, decode_batch=math.nan, bottleneck="overloaded",
                              overloaded=True, ttft_dist=dist, tpot_dist=dist)
    else:
        x, st, bottleneck = _solve_closed(costs, isl, osl, point.value)
    assert st is not None
    wave_ttft: tuple[float, ...] = ()
    wave_weight = 0.0
    out_tok_s = x * osl
    tpot_wave: tuple[float, ...] = ()
    if point.requests_per_slot is not None:
        n = int(point.value)
        w_ttft, w_tpot = _first_wave(costs, isl, osl, n, st)
        wave_weight = 1.0 / point.requests_per_slot
        wave_ttft = tuple(v * 1e3 for v in w_ttft)
        tpot_wave = tuple(v * 1e3 for v in w_tpot)
        # wall time: every slot runs requests_per_slot cycles, shifted by its first request's extra
        # wait; the run ends with the slowest of the last n requests (the jitter's extreme)
        lag = float(np.mean(w_ttft)) + costs.jitter_s - st.ttft
        drain = costs.jitter_s * (sum(1.0 / k for k in range(1, n + 1)) - 1.0)
        duration = point.requests_per_slot * st.cycle + max(lag, 0.0) + drain
        out_tok_s = point.requests_per_slot * n * osl / duration
    # A queue's wait is random on the time scale of its departures; beyond that (a saturated
    # closed loop, where the queue holds everyone not elsewhere) it is a fixed excess.
    random_wait = min(st.wait, 2.0 * st.wait_scale + costs.jitter_s)
    fixed_wait = st.wait - random_wait
    wait_prob = 1.0 if fixed_wait > 0 else st.wait_prob
    wait_mean = random_wait / wait_prob if wait_prob > 0 else 0.0
    ttft_dist = LatencyDistribution(base_ms=(st.base + fixed_wait) * 1e3, jitter_ms=costs.jitter_s * 1e3,
                                    wait_prob=wait_prob,
                                    wait_ms=wait_mean * 1e3, wave_ms=wave_ttft, wave_weight=wave_weight)
    tpot_dist = LatencyDistribution(base_ms=st.tpot * 1e3, sd_ms=st.tpot_sd * 1e3, wave_ms=tpot_wave,
                                    wave_weight=wave_weight)
    med_ttft, p99_ttft = ttft_dist.quantiles([0.5, 0.99])
    med_tpot, p99_tpot = tpot_dist.quantiles([0.5, 0.99])
    return Prediction(
        deployment=deployment, point=point,
        med_ttft_ms=med_ttft, mean_ttft_ms=ttft_dist.mean(), p99_ttft_ms=p99_ttft,
        med_tpot_ms=med_tpot, p99_tpot_ms=p99_tpot,
        out_tok_s=out_tok_s, req_s=out_tok_s / osl, prefill_utilization=st.utilization,
        decode_batch=st.batch + 1.0 if st.batch > 0 else st.batch, bottleneck=bottleneck, overloaded=overloaded,
        ttft_dist=ttft_dist, tpot_dist=tpot_dist)


def _capacity(c: SystemCosts, isl: int, osl: int) -> float:
    """Largest open-loop rate (req/s) every stage keeps up with."""
    lo, hi = 0.0, 1.0
    while _ok(c, isl, osl, hi) and hi < 1e7:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        if _ok(c, isl, osl, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _ok(c: SystemCosts, isl: int, osl: int, x: float) -> bool:
    """Open loop: every stage keeps up with ``x`` req/s below its KV-capacity limit."""
    st = _state(c, isl, osl, x, None, False)
    return st is not None and not _over_kv(c, st, isl, osl)
