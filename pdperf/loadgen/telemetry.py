"""Server-side telemetry of a load point: vLLM's own Prometheus counters, before and after.

Why: a client sees TTFT; only the engine knows how much of it was queueing, prefill, KV
transfer (NIXL) or decode. Histograms and counters are cumulative, so a scrape before and
after the measured window gives exact per-window sums and counts (``Δsum / Δcount`` is the
window's mean); gauges (KV-cache use) are sampled during the window and their maximum kept.

Names move between versions and exporters: vLLM writes ``vllm:ttft...``; through Ray's
metrics agent the same metric is ``ray_vllm_ttft...``; older vLLM called inter-token latency
``vllm:time_per_output_token_seconds``. Every name is normalised (``:`` -> ``_``, a leading
``ray_`` dropped) and each output key lists its candidates; an absent metric gives ``None``,
never an error. Sums are taken over all label sets (engines, models) and all URLs.

The flat keys the report reads (``queue_time_s``, ``prefill_time_s``, ``decode_time_s``,
``kv_transfer_time_s``) are means per request (per transfer for ``kv_transfer_time_s``).
A counter that went down between the scrapes (an engine restarted) is listed in
``counter_resets`` and its "after" value used as the delta.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pdperf.loadgen.hostcpu import HostCpuSampler
from pdperf.results import Telemetry

SampleKey = tuple[str, tuple[tuple[str, str], ...]]

# flat key -> histogram base names (normalised), first present wins
HISTOGRAM_MEANS: dict[str, tuple[str, ...]] = {
    "server_ttft_mean_s": ("vllm_time_to_first_token_seconds",),
    "server_itl_mean_s": ("vllm_inter_token_latency_seconds", "vllm_time_per_output_token_seconds"),
    "server_tpot_mean_s": ("vllm_request_time_per_output_token_seconds",),
    "server_e2e_mean_s": ("vllm_e2e_request_latency_seconds",),
    "queue_time_s": ("vllm_request_queue_time_seconds",),
    "prefill_time_s": ("vllm_request_prefill_time_seconds",),
    "decode_time_s": ("vllm_request_decode_time_seconds",),
    "inference_time_s": ("vllm_request_inference_time_seconds",),
    "kv_transfer_time_s": ("vllm_nixl_xfer_time_seconds",),
    "kv_post_time_s": ("vllm_nixl_post_time_seconds",),
    # per NIXL transfer, each over its own histogram's count (the counts of the time and the bytes
    # histograms can differ within one window)
    "kv_bytes_per_transfer": ("vllm_nixl_bytes_transferred",),
    "kv_descriptors_per_transfer": ("vllm_nixl_num_descriptors",),
}
# flat key -> (histogram base, "sum"|"count")
HISTOGRAM_TOTALS: dict[str, tuple[tuple[str, ...], str]] = {
    "server_requests": (("vllm_e2e_request_latency_seconds",), "count"),
    "kv_transfers": (("vllm_nixl_xfer_time_seconds",), "count"),
    "kv_bytes": (("vllm_nixl_bytes_transferred",), "sum"),
}
# flat key -> counter names (normalised, without _total), first present wins
COUNTERS: dict[str, tuple[str, ...]] = {
    "preemptions": ("vllm_num_preemptions",),
    "kv_failed_transfers": ("vllm_nixl_num_failed_transfers",),
    "kv_expired_requests": ("vllm_nixl_num_kv_expired_reqs",),
    "prompt_tokens": ("vllm_prompt_tokens",),
    "generation_tokens": ("vllm_generation_tokens",),
    "prefix_cache_queries": ("vllm_prefix_cache_queries", "vllm_gpu_prefix_cache_queries"),
    "prefix_cache_hits": ("vllm_prefix_cache_hits", "vllm_gpu_prefix_cache_hits"),
}
GAUGES: dict[str, tuple[str, ...]] = {
    "kv_cache_usage_perc": ("vllm_kv_cache_usage_perc", "vllm_gpu_cache_usage_perc"),
    "requests_running": ("vllm_num_requests_running",),
    "requests_waiting": ("vllm_num_requests_waiting",),
}

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')


def normalize_name(name: str) -> str:
    """``vllm:x`` and ``ray_vllm_x`` both become ``vllm_x``."""
    n = name.replace(":", "_")
    return n[4:] if n.startswith("ray_") else n


def _unescape(v: str) -> str:
    return v.replace("\\\\", "\x00").replace('\\"', '"').replace("\\n", "\n").replace("\x00", "\\")


def _value(s: str) -> float:
    if s in ("+Inf", "Inf"):
        return math.inf
    if s == "-Inf":
        return -math.inf
    return float(s)  # "NaN" parses too


def parse_prometheus(text: str) -> dict[SampleKey, float]:
    """Samples of a Prometheus text exposition: ``{(normalised name, sorted labels): value}``.

    Comments and ``# TYPE``/``# HELP`` lines are skipped (types are recovered from suffixes);
    ``_created`` samples (prometheus_client's creation timestamps) are dropped; a line that is
    not a sample is skipped rather than failing the whole scrape.
    """
    out: dict[SampleKey, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name = normalize_name(m.group(1))
        if name.endswith("_created"):
            continue
        labels: tuple[tuple[str, str], ...] = ()
        if m.group(2):
            body = m.group(2)[1:-1]
            labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(body)))
        try:
            out[(name, labels)] = _value(m.group(3))
        except ValueError:
            continue
    return out


@dataclass
class Delta:
    """Per-sample differences of two scrapes, and the counters that went backwards."""

    values: dict[SampleKey, float]
    resets: set[str] = field(default_factory=set)

    def total(self, name: str) -> float | None:
        """Sum of the deltas of every sample named ``name`` (None if there is none)."""
        found = False
        acc = 0.0
        for (n, _labels), v in self.values.items():
            if n == name:
                found = True
                acc += v
        return acc if found else None

    def buckets(self, base: str) -> dict[str, float]:
        """Histogram bucket deltas summed over label sets: ``{le: count}``."""
        out: dict[str, float] = {}
        for (n, labels), v in self.values.items():
            if n == base + "_bucket":
                le = dict(labels).get("le", "")
                out[le] = out.get(le, 0.0) + v
        return out


def delta(before: dict[SampleKey, float], after: dict[SampleKey, float]) -> Delta:
    values: dict[SampleKey, float] = {}
    resets: set[str] = set()
    names = {k[0] for k in after}
    for key, v_after in after.items():
        v_before = before.get(key, 0.0)
        d = v_after - v_before
        if d < 0 and _is_cumulative(key[0], names):
            resets.add(key[0])
            d = v_after
        values[key] = d
    return Delta(values, resets)


def _is_cumulative(name: str, names: set[str] | frozenset[str] = frozenset()) -> bool:
    """A counter (``_total``) or a histogram's parts. ``_sum``/``_count`` only beside their sibling
    (or buckets): Ray's own ``operation_active_count`` is a gauge, and its falls read as engine restarts."""
    if name.endswith(("_total", "_bucket")):
        return True
    for suffix, sibling in (("_sum", "_count"), ("_count", "_sum")):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            return not names or base + sibling in names or base + "_bucket" in names
    return False


def scrape(urls: Iterable[str], *, timeout_s: float = 5.0) -> tuple[dict[str, str], dict[str, str]]:
    """GET each ``/metrics`` URL: ``({url: text}, {url: error})``. Loopback-only is the caller's rule."""
    texts: dict[str, str] = {}
    errors: dict[str, str] = {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url in urls:
        try:
            with opener.open(url, timeout=timeout_s) as resp:
                texts[url] = resp.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors[url] = f"{type(e).__name__}: {e}"
    return texts, errors


def _first_present(d: Delta, names: tuple[str, ...], suffix: str) -> tuple[str | None, float | None]:
    for n in names:
        v = d.total(n + suffix)
        if v is not None:
            return n, v
    return None, None


def _bucket_counts(cumulative: dict[str, float]) -> list[tuple[float, float, float]]:
    """``(lower, upper, count)`` per bucket from Prometheus' cumulative ``{le: count}`` (the
    implicit +Inf bucket has upper ``inf``); [] when there are no finite bounds."""
    finite = sorted((float(le), c) for le, c in cumulative.items() if le not in ("+Inf", "Inf", "inf"))
    if not finite:
        return []
    out, below, lower = [], 0.0, 0.0 if finite[0][0] > 0 else finite[0][0] * 2.0
    for upper, cum in finite:
        out.append((lower, upper, max(cum - below, 0.0)))
        below, lower = cum, upper
    total = max((c for le, c in cumulative.items() if le in ("+Inf", "Inf", "inf")), default=below)
    out.append((lower, math.inf, max(total - below, 0.0)))
    return out


def ray_midpoint_sum(buckets: list[tuple[float, float, float]]) -> float:
    """The sum Ray's metrics export reports for these bucket counts: it keeps no sums, and replays
    each observation at its bucket's midpoint (the +Inf bucket's at twice the last bound; Ray
    2.58-2.60, ray/_private/telemetry/open_telemetry_metric_recorder.py)."""
    acc = 0.0
    for lower, upper, count in buckets:
        mid = (lower + upper) / 2.0 if upper != math.inf else (1.0 if lower <= 0 else lower * 2.0)
        acc += mid * count
    return acc


def _midpoint_bounds(d: Delta, base: str, total: float, count: float) -> list[float | None] | None:
    """Where ``total`` is exactly what Ray's export makes of ``base``'s bucket counts (an estimate),
    the per-observation mean the buckets prove, ``[low, high]`` (high None past the last bound)."""
    buckets = _bucket_counts(d.buckets(base))
    if not buckets or not math.isclose(total, ray_midpoint_sum(buckets), rel_tol=1e-9, abs_tol=1e-12):
        return None
    n = sum(b[2] for b in buckets) or count
    high = sum(hi * k for _, hi, k in buckets if k) / n
    return [sum(lo * k for lo, _, k in buckets) / n, None if math.isinf(high) else high]


def flat_from_delta(d: Delta) -> dict[str, Any]:
    """The flat keys (means per request, totals) from one delta (one URL or all merged).

    A mean whose sum is exactly what Ray's export makes of the bucket counts is an estimate
    (on 4x H100 and on CPU every Ray point's queue time read 0.15 s: the midpoint of vLLM's
    first bucket, 0-0.3 s, while TTFT was 47 ms): listed in ``estimated_means``, with the bounds
    the buckets do prove in ``mean_bounds_s`` (each observation anywhere in its bucket)."""
    out: dict[str, Any] = {}
    estimated: list[str] = []
    bounds: dict[str, list[float | None]] = {}
    for key, names in HISTOGRAM_MEANS.items():
        base, s = _first_present(d, names, "_sum")
        c = d.total(base + "_count") if base else None
        if base is None or s is None or not c:
            out[key] = None
            continue
        out[key] = s / c
        proven = _midpoint_bounds(d, base, s, c)
        if proven:
            estimated.append(key)
            bounds[key] = proven
    for key, (names, part) in HISTOGRAM_TOTALS.items():
        _, v = _first_present(d, names, "_" + part)
        out[key] = v
    out["estimated_means"] = estimated
    out["mean_bounds_s"] = bounds
    for key, names in COUNTERS.items():
        v = None
        for name in names:
            v = d.total(name + "_total")
            if v is None:
                v = d.total(name)
            if v is not None:
                break
        out[key] = v
    q, h = out.get("prefix_cache_queries"), out.get("prefix_cache_hits")
    out["prefix_cache_hit_rate"] = (h / q) if (q and h is not None) else None
    return out


def gauge_max(snapshots: Iterable[dict[SampleKey, float]], names: tuple[str, ...]) -> float | None:
    """Largest value of a gauge over scrapes and label sets (None if never present)."""
    best: float | None = None
    for snap in snapshots:
        for (n, _labels), v in snap.items():
            if n in names and not math.isnan(v):
                best = v if best is None else max(best, v)
    return best


def summarize(before: dict[str, str], after: dict[str, str], during: Iterable[dict[str, str]] = (),
              errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat telemetry of one window from raw scrape texts keyed by URL.

    Returns the flat keys (:data:`HISTOGRAM_MEANS`, :data:`HISTOGRAM_TOTALS`, :data:`COUNTERS`,
    ``<gauge>_max``) over all URLs, plus ``by_url`` (the same per URL), ``raw`` (every
    cumulative sample's delta per URL, NIXL names included), ``counter_resets`` and
    ``scrape_errors``.
    """
    during = list(during)
    parsed_before = {u: parse_prometheus(t) for u, t in before.items()}
    parsed_after = {u: parse_prometheus(t) for u, t in after.items()}
    parsed_during = [{u: parse_prometheus(t) for u, t in snap.items()} for snap in during]
    merged: dict[SampleKey, float] = {}
    by_url: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    resets: list[str] = []
    for url, a in parsed_after.items():
        if url not in parsed_before:
            continue
        d = delta(parsed_before[url], a)
        by_url[url] = flat_from_delta(d)
        for (n, labels), v in d.values.items():
            merged[(n, (("__url__", url),) + labels)] = v
        present = {n for n, _ in d.values}
        raw[url] = {_fmt_key(k): v for k, v in sorted(d.values.items())
                    if _is_cumulative(k[0], present) and v != 0 and not k[0].endswith("_bucket")}
        raw[url]["nixl_buckets"] = {n: d.buckets(n) for n in sorted({k[0][:-7] for k in d.values
                                                                      if "nixl" in k[0] and k[0].endswith("_bucket")})}
        resets.extend(f"{url} {n}" for n in sorted(d.resets))
    flat = flat_from_delta(Delta(merged))
    all_snaps = [snap for snaps in parsed_during for snap in snaps.values()] + list(parsed_after.values())
    for key, names in GAUGES.items():
        flat[f"{key}_max"] = gauge_max(all_snaps, names)
        for url in by_url:
            per = [s[url] for s in parsed_during if url in s] + [parsed_after[url]]
            by_url[url][f"{key}_max"] = gauge_max(per, names)
    nixl_names = sorted({k[0] for snaps in parsed_after.values() for k in snaps if "nixl" in k[0]})
    return {**flat, "nixl_metrics_present": nixl_names, "by_url": by_url, "raw": raw,
            "counter_resets": resets, "scrape_errors": dict(errors or {}), "samples_during": len(during)}


_GAUGE_MARKERS = tuple({n.split("_", 1)[1] for names in GAUGES.values() for n in names})


def _gauge_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if line and line[0] != "#" and any(m in line for m in _GAUGE_MARKERS))


def _fmt_key(key: SampleKey) -> str:
    name, labels = key
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


# NVML's clock event reasons (nvidia-smi's clocks_event_reasons.active bit mask)
CLOCK_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                 0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
_GPU_QUERY = ("index", "clocks.sm", "power.draw", "temperature.gpu")
_REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # newer name first


def reason_names(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_REASONS.items() if mask & bit] + ([f"0x{mask:x}"] if mask >> 9 else [])


class GpuSampler:
    """This host's GPUs during a load point: SM clock, power, temperature and why clocks are held.

    The same topology measured 1.6x slower per token in one session than in another, and within
    one point the pace stepped from 19 to 31 ms per token and stayed (4x H100, eager): clocks or
    a host slowdown? A point now keeps each GPU's series (``nvidia-smi``, once a telemetry
    interval, from the parent process, never from the processes timing the streams) and the
    reasons NVML gave for clocks below their maximum. Only the host the client runs on: a
    multi-node cluster's other GPUs are not seen.
    """

    def __init__(self, *, timeout_s: float = 5.0, clock=time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.t0: float | None = None
        self.series: dict[str, list[list]] = {}  # gpu index -> [[t_s, sm_mhz, power_w, temp_c, reasons mask]]
        self.errors: list[str] = []
        self._reason_field: str | None = _REASON_FIELDS[0]

    @staticmethod
    def available() -> bool:
        return shutil.which("nvidia-smi") is not None

    def _query(self, reason_field: str | None) -> subprocess.CompletedProcess:
        fields = _GPU_QUERY + ((reason_field,) if reason_field else ())
        return subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=self.timeout_s)

    def sample(self) -> None:
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        t = round(now - self.t0, 2)
        try:
            out = self._query(self._reason_field)
            while out.returncode != 0 and self._reason_field is not None:  # an older driver: the older name, or none
                i = _REASON_FIELDS.index(self._reason_field) + 1
                self._reason_field = _REASON_FIELDS[i] if i < len(_REASON_FIELDS) else None
                out = self._query(self._reason_field)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        if out.returncode != 0:
            self.errors.append(f"nvidia-smi exit {out.returncode}: {out.stderr.strip()[:200]}")
            return
        for line in out.stdout.splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) < len(_GPU_QUERY):
                continue
            mask = int(cells[4], 16) if len(cells) > 4 and cells[4].startswith("0x") else None
            self.series.setdefault(cells[0], []).append([t, *(_number(c) for c in cells[1:4]), mask])

    def result(self) -> dict[str, Any]:
        """Per GPU: SM clock min / max while busy, power and temperature max, the reasons seen while busy."""
        if not self.series:
            return {"errors": self.errors[:5]} if self.errors else {}
        per_gpu = {}
        for idx, rows in sorted(self.series.items()):
            busy = [r for r in rows if r[4] is None or not r[4] & 0x1] or rows
            mask = 0
            for r in busy:
                mask |= r[4] or 0
            clocks = [r[1] for r in busy if r[1] is not None]
            per_gpu[idx] = {
                "samples": len(rows), "busy_samples": len(busy),
                "sm_clock_mhz_min": min(clocks) if clocks else None, "sm_clock_mhz_max": max(clocks) if clocks else None,
                "power_w_max": _max(r[2] for r in rows), "temp_c_max": _max(r[3] for r in rows),
                "clock_reasons_busy": reason_names(mask & ~0x1),
            }
        return {"per_gpu": per_gpu, "series": self.series, "series_fields": ["t_s", "sm_clock_mhz", "power_w",
                                                                              "temp_c", "clock_reasons_mask"],
                "errors": self.errors[:5]}


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


class TelemetryWindow:
    """Before / during / after scrapes of a set of ``/metrics`` URLs around one window.

    ``sample()`` during the window only fetches text (cheap: parsing waits until ``result()``),
    so sampling adds no parsing stall to the process that is timing streams. The server pays for
    every scrape, though: vLLM renders ``/metrics`` in its API-server process, on the event loop
    that streams the tokens (~7 ms of that process's CPU a scrape for the tiny CPU model's ~50 KB,
    measured here; once a second under this client the H200 server's API process used 13 % more
    CPU per token at c1 than under vllm bench serve). So during the window the URLs are scraped at
    most every ``scrape_interval_s`` (the GPU and host samplers, which read this host only, at
    every call).
    """

    def __init__(self, urls: Iterable[str], *, timeout_s: float = 5.0, gpu: GpuSampler | None = None,
                 host: HostCpuSampler | None = None, scrape_interval_s: float = 10.0) -> None:
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.gpu = gpu
        self.host = host
        self.scrape_interval_s = scrape_interval_s
        self._last_scrape: float | None = None
        self.before: dict[str, str] = {}
        self.after: dict[str, str] = {}
        self.during: list[dict[str, str]] = []
        self.errors: dict[str, str] = {}

    def _scrape(self) -> dict[str, str]:
        texts, errors = scrape(self.urls, timeout_s=self.timeout_s)
        self.errors.update(errors)
        return texts

    @property
    def active(self) -> bool:
        """Whether sampling during the window records anything."""
        return bool(self.urls or self.gpu or self.host)

    def _samplers(self) -> None:
        for sampler in (self.gpu, self.host):
            if sampler:
                sampler.sample()

    def start(self) -> None:
        if self.urls:
            self.before = self._scrape()
            self._last_scrape = time.monotonic()
        self._samplers()

    def sample(self) -> None:
        """Keep only the gauge lines of a scrape taken during the window (memory stays small)."""
        now = time.monotonic()
        if self.urls and (self._last_scrape is None or now - self._last_scrape >= self.scrape_interval_s):
            self._last_scrape = now
            self.during.append({u: _gauge_lines(t) for u, t in self._scrape().items()})
        self._samplers()

    def stop(self) -> None:
        if self.urls:
            self.after = self._scrape()
        self._samplers()

    def result(self) -> Telemetry:
        out = summarize(self.before, self.after, self.during, self.errors) if self.urls else {}
        gpu = self.gpu.result() if self.gpu else {}
        if gpu:
            out["gpu"] = gpu
        host = self.host.result() if self.host else {}
        if host:
            out["host_cpu"] = host
        return Telemetry.model_validate(out)
