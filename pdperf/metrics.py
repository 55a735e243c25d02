"""Metric definitions: one place, one meaning (docs/METHODOLOGY.md explains each).

All latencies start at the request's *scheduled* send time, so client-side queueing is
inside TTFT and E2E and also reported alone as ``queue_ms``.

- ``ttft_ms``  = first content token arrival - scheduled send
- ``e2e_ms``   = last content token arrival - scheduled send
- ``tpot_ms``  = (e2e - ttft) / (output_tokens - 1)   (vLLM's definition; needs >= 2 tokens)
- ``itl_ms``   = per-token gaps: a chunk that carries k tokens after a gap g adds k samples
                 of g / k, so multi-token chunks do not masquerade as long stalls
- ``queue_ms`` = actual send - scheduled send (time the client held the request back)
- ``chunk_gap_ms`` = gaps between consecutive content chunks, as a reader of the stream sees
                 them (stutter); unlike ``itl_ms`` it is not divided by the tokens a chunk carries,
                 so server-side batching of the stream (Ray's stream batching) shows here

Percentiles use linear interpolation between order statistics (numpy's default, as vLLM
bench does); the p99 interval is a seeded percentile bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from pdperf.results import Distribution, PointSummary, RequestRecord, SloResult, Throughput
from pdperf.stats import statistic_value

if TYPE_CHECKING:
    from pdperf.specs import SLO

Direction = Literal["lower-is-better", "higher-is-better"]
#: request: one sample per request; gap: one per inter-token or inter-chunk gap (many per request,
#: moving together); point: one value per load point (throughput, goodput)
Granularity = Literal["request", "gap", "point"]


@dataclass(frozen=True)
class Metric:
    """A named quantity the suite reports, gates or bounds: its unit, which way is better, and
    how many samples a point gives (what a gate can test it on)."""

    name: str
    label: str
    unit: str
    direction: Direction
    granularity: Granularity
    description: str

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower-is-better"


#: Every metric, defined once (specs, the gate, the report, the CLI read them from here).
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("ttft_ms", "TTFT", "ms", "lower-is-better", "request", "first token's arrival - scheduled send"),
    Metric("tpot_ms", "TPOT", "ms", "lower-is-better", "request", "(e2e - ttft) / (output tokens - 1)"),
    Metric("itl_ms", "ITL", "ms", "lower-is-better", "gap", "per-token gaps (a chunk of k tokens: k gaps of g/k)"),
    Metric("chunk_gap_ms", "chunk gap", "ms", "lower-is-better", "gap", "gaps between content chunks"),
    Metric("e2e_ms", "E2E", "ms", "lower-is-better", "request", "last token's arrival - scheduled send"),
    Metric("queue_ms", "queue", "ms", "lower-is-better", "request", "actual send - scheduled send"),
    Metric("req_per_s", "requests/s", "req/s", "higher-is-better", "point", "successful requests / window"),
    Metric("input_tok_per_s", "input tok/s", "tok/s", "higher-is-better", "point", "prompt tokens / window"),
    Metric("output_tok_per_s", "output tok/s", "tok/s", "higher-is-better", "point", "output tokens / window"),
    Metric("output_tok_per_s_per_gpu", "output tok/s/GPU", "tok/s", "higher-is-better", "point",
           "output tokens / window / GPUs"),
    Metric("goodput_req_per_s", "goodput", "req/s", "higher-is-better", "point",
           "requests meeting every per-request SLO bound / window"),
    Metric("slo_attainment", "SLO attainment", "", "higher-is-better", "point",
           "share of measured requests meeting every per-request SLO bound"),
)}
#: Metrics with samples (per request or per gap): what a distribution, an SLO or a gate is about.
LATENCY_METRICS = tuple(n for n, m in METRICS.items() if m.granularity != "point")
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
UNITS = {n: m.unit for n, m in METRICS.items()}
HIGHER_IS_BETTER = frozenset(n for n, m in METRICS.items() if not m.lower_is_better)


def pkey(p: float) -> str:
    """Summary key of a percentile: 50 -> 'p50', 99.9 -> 'p99.9'."""
    return f"p{p:g}"


def ttft_ms(r: RequestRecord) -> float | None:
    if r.first_token_s is None:
        return None
    return (r.first_token_s - r.scheduled_s) * 1000.0


def e2e_ms(r: RequestRecord) -> float | None:
    if r.end_s is None:
        return None
    return (r.end_s - r.scheduled_s) * 1000.0


def queue_ms(r: RequestRecord) -> float | None:
    if r.sent_s is None:
        return None
    return (r.sent_s - r.scheduled_s) * 1000.0


def tpot_ms(r: RequestRecord) -> float | None:
    if r.first_token_s is None or r.end_s is None or r.output_tokens < 2:
        return None
    return (r.end_s - r.first_token_s) * 1000.0 / (r.output_tokens - 1)


def itl_ms(r: RequestRecord) -> list[float]:
    """Per-token inter-token latencies of one request (empty for < 2 chunks)."""
    times = r.chunk_times_s
    tokens = r.chunk_tokens if len(r.chunk_tokens) == len(times) else [1] * len(times)
    out: list[float] = []
    for i in range(1, len(times)):
        k = max(int(tokens[i]), 1)
        gap = (times[i] - times[i - 1]) * 1000.0 / k
        out.extend([gap] * k)
    return out


def chunk_gap_ms(r: RequestRecord) -> list[float]:
    """Gaps between consecutive content chunks of one request (ms), whatever each chunk carries."""
    t = r.chunk_times_s
    return [(t[i] - t[i - 1]) * 1000.0 for i in range(1, len(t))]


_SCALAR = {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "e2e_ms": e2e_ms, "queue_ms": queue_ms}
_PER_GAP = {"itl_ms": itl_ms, "chunk_gap_ms": chunk_gap_ms}
#: One sample per request, so a point has at most as many as it sends (the per-gap ones have many more).
PER_REQUEST_METRICS = tuple(_SCALAR)
#: Many samples per request: gaps of one request move together (one slow stretch slows them all).
PER_GAP_METRICS = tuple(_PER_GAP)
#: The statistics of each request's gaps kept with a baseline, for the gate's per-request judgement.
REQUEST_STATISTICS = ("p50", "p90", "p99")


def per_request_values(records: Iterable[RequestRecord], metric: str, statistic: str) -> np.ndarray:
    """One value per successful measured request with a gap: ``statistic`` ("p50", "mean") of that request's gaps."""
    if metric not in _PER_GAP:
        raise ValueError(f"per_request_values: {metric} has one sample per request already")
    gaps = (_PER_GAP[metric](r) for r in records if r.ok and not r.warmup)
    return np.asarray([statistic_value(np.asarray(g, dtype=float), statistic) for g in gaps if g], dtype=float)


def samples(records: Iterable[RequestRecord], metric: str) -> np.ndarray:
    """All samples of ``metric`` over the successful, non-warm-up requests.

    ``queue_ms`` also counts requests that failed after they were sent: queueing happened
    whether or not the request later timed out, and dropping them would flatter overload.
    """
    if metric == "queue_ms":
        return np.asarray([v for v in (queue_ms(r) for r in records if not r.warmup) if v is not None], dtype=float)
    good = [r for r in records if r.ok and not r.warmup]
    if metric in _PER_GAP:
        vals: list[float] = []
        for r in good:
            vals.extend(_PER_GAP[metric](r))
        return np.asarray(vals, dtype=float)
    fn = _SCALAR[metric]
    return np.asarray([v for v in (fn(r) for r in good) if v is not None], dtype=float)


def bootstrap_ci(values: np.ndarray, percentile: float, *, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap confidence interval of a percentile; None below 10 samples."""
    if len(values) < 10:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    stats = np.percentile(values[idx], percentile, axis=1)
    lo, hi = np.percentile(stats, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def describe(values: np.ndarray) -> Distribution:
    if len(values) == 0:
        return Distribution()
    p50, p90, p95, p99, p999 = (float(v) for v in np.percentile(values, PERCENTILES))
    return Distribution(n=int(len(values)), mean=float(np.mean(values)), p50=p50, p90=p90, p95=p95, p99=p99,
                        p99_9=p999, p99_ci=bootstrap_ci(values, 99.0))


def meets(r: RequestRecord, slos: Sequence[SLO]) -> bool:
    """Whether one request meets every per-request SLO bound (used for goodput).

    A request meets ``p99_ttft_ms <= 500`` when its own TTFT is <= 500 ms (the SLO's percentile
    applies to the point, the bound to each request), as in vLLM's and DistServe's goodput.
    """
    if not r.ok:
        return False
    for slo in slos:
        if slo.metric == "itl_ms":
            vals = itl_ms(r)
            v = max(vals) if vals else None
        else:
            v = _SCALAR[slo.metric](r)
        if v is not None and v > slo.bound:
            return False
    return True


def slo_observed(measured: Sequence[RequestRecord], metric: str, percentile: float) -> float | None:
    """The SLO's percentile over every measured request, a failed one counted as missing any bound.

    Why not the survivors alone: 49 failed requests out of 60 leave 11 fast ones whose p99
    meets any SLO. A failed request is a sample at +inf (one per request, also for per-gap
    metrics), so the percentile is infinite as soon as failures reach its tail; None then, and
    when there are no samples at all.
    """
    vals = samples(measured, metric)
    failed = sum(1 for r in measured if not r.ok) if metric != "queue_ms" else 0
    if not failed:
        return float(np.percentile(vals, percentile)) if len(vals) else None
    ordered = np.sort(vals)  # the failures sort after every sample: indices past the end are +inf
    n = len(ordered) + failed
    pos = percentile / 100.0 * (n - 1)  # numpy's linear interpolation, with +inf where it lands on a failure
    lo, frac = int(np.floor(pos)), pos - np.floor(pos)
    if lo >= len(ordered) or (frac > 0 and lo + 1 >= len(ordered)):
        return None
    return float(ordered[lo] + (ordered[lo + 1] - ordered[lo]) * frac) if frac > 0 else float(ordered[lo])


def summarize(records: Sequence[RequestRecord], *, duration_s: float, gpus: int = 0,
              slos: Sequence[SLO] = (), error_budget: float = 0.0) -> PointSummary:
    """The point's summary: distributions, throughput, goodput, SLO verdicts, errors."""
    measured = [r for r in records if not r.warmup]
    good = [r for r in measured if r.ok]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in measured:
        if not r.ok:
            kind = r.error or "incomplete"
            errors[kind] = errors.get(kind, 0) + 1
            if kind not in examples and r.error_detail:
                examples[kind] = r.error_detail
    dur = max(duration_s, 1e-9)
    out_tok = sum(r.output_tokens for r in good)
    in_tok = sum(r.input_tokens for r in good)
    meeting = sum(1 for r in good if meets(r, slos)) if slos else len(good)
    n_failed = len(measured) - len(good)
    slo_results = []
    for slo in slos:
        observed = slo_observed(measured, slo.metric, slo.percentile)
        slo_results.append(SloResult(
            slo=str(slo), metric=slo.metric, percentile=slo.percentile, bound=slo.bound, observed=observed,
            passed=observed is not None and observed <= slo.bound,
            # the failures alone decide it (their latency is unbounded)
            failed_requests=n_failed if observed is None and n_failed and slo.metric != "queue_ms" else None))
    return PointSummary(
        requests=len(measured), requests_ok=len(good), requests_failed=n_failed, errors=errors,
        error_examples=examples, error_budget=error_budget, duration_s=duration_s,
        metrics={m: describe(samples(measured, m)) for m in LATENCY_METRICS},
        throughput=Throughput(req_per_s=len(good) / dur, input_tok_per_s=in_tok / dur, output_tok_per_s=out_tok / dur,
                              output_tok_per_s_per_gpu=(out_tok / dur / gpus) if gpus else None),
        goodput_req_per_s=meeting / dur, slo_attainment=(meeting / len(measured)) if measured else None,
        slos=slo_results)
