"""The HTML summary of a run: what a perf engineer reads, shares and links from a CI job.

One self-contained file (inline CSS, inline SVG, no JavaScript, nothing fetched), so it
opens offline from its folder and survives being attached to a ticket. It leads with
what needs attention (failed tests, regressions, flagged points such as replica restarts,
failed requests, p99s computed from too few requests, identical points under two names),
then the run's environment, the verdicts with the reason for every skip, the numbers per
topology, the plots, PD against collocated at equal GPU count, and each PD point against the
planner's prediction (pdperf.report.planner). The same content,
without the ``<html>`` wrapper, is :func:`summary_fragment` for the pytest-html report.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from pdperf import __version__, metrics
from pdperf.gate.mde import LITTLE_NOTE, POWER, TARGET_CHANGE, Mde, mde_warnings
from pdperf.gate.verdicts import GateResult
from pdperf.network import kv_path_summary
from pdperf.report.planner import PlannerSection, PredictedPoint, ProfileGroup
from pdperf.report.plots import (
    LegendItem,
    RatioRow,
    Series,
    line_chart,
    no_data,
    palette_color,
    ratio_chart,
    stacked_bar_chart,
    trim_ratio_rows,
)
from pdperf.report.rundata import RunData, latency, point_summary, throughput, topology_kind
from pdperf.results import PointResult, PointSummary, SloResult, Telemetry
from pdperf.stats import format_value

#: Fewer successful requests than this and a p99 is little more than the maximum (FINDINGS: ~1000 for stability).
LOW_P99_SAMPLES = 100
TABLE_METRICS = tuple((m, metrics.METRICS[m].label) for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"))
TABLE_STATS = ("p50", "p90", "p99")
TELEMETRY_SEGMENTS = ("queue_time_s", "prefill_time_s", "kv_transfer_time_s", "decode_time_s")
TELEMETRY_LABELS = {"queue_time_s": "queue", "prefill_time_s": "prefill", "kv_transfer_time_s": "KV transfer",
                    "decode_time_s": "decode"}
OUTCOME_ORDER = {"failed": 0, "error": 0, "skipped": 1, "passed": 2}
#: PD "wins" a ratio below 1 - EVEN_BAND and "loses" above 1 + EVEN_BAND when no interval is at hand.
EVEN_BAND = 0.05

CSS = """
.pdperf-report { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif;
  font-size: 14px; color: #1a1a1a; line-height: 1.4; }
.pdperf-report h1 { font-size: 22px; margin: 8px 0 4px; }
.pdperf-report h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
.pdperf-report h3 { font-size: 15px; margin: 18px 0 6px; }
.pdperf-report table { border-collapse: collapse; margin: 6px 0 12px; font-size: 12.5px; }
.pdperf-report th, .pdperf-report td { border: 1px solid #d6d6d6; padding: 3px 7px; text-align: left;
  vertical-align: top; }
.pdperf-report th { background: #f3f5f7; font-weight: 600; }
.pdperf-report td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pdperf-report td.lowconf { color: #8a6d00; font-style: italic; }
.pdperf-report tr.flagged td { background: #fff1f0; }
.pdperf-report .flag { color: #fff; background: #c62828; border-radius: 3px; padding: 1px 5px; font-weight: 700;
  font-size: 11.5px; }
.pdperf-report .err { color: #c62828; font-weight: 600; }
.pdperf-report .banner { padding: 10px 14px; border-radius: 6px; margin: 10px 0; font-size: 15px; }
.pdperf-report .banner.bad { background: #fdecea; border: 2px solid #c62828; }
.pdperf-report .banner.good { background: #e8f5e9; border: 2px solid #2e7d32; }
.pdperf-report .attention { background: #fff8e1; border: 2px solid #f9a825; border-radius: 6px;
  padding: 8px 14px; margin: 10px 0; }
.pdperf-report .attention li.loud { color: #b71c1c; font-weight: 700; }
.pdperf-report .badge { display: inline-block; border-radius: 3px; padding: 0 6px; color: #fff;
  font-size: 12px; font-weight: 700; }
.pdperf-report .b-passed, .pdperf-report .b-improved, .pdperf-report .b-unchanged { background: #2e7d32; }
.pdperf-report .b-failed, .pdperf-report .b-error, .pdperf-report .b-regressed { background: #c62828; }
.pdperf-report .b-skipped, .pdperf-report .b-insufficient, .pdperf-report .b-missing,
.pdperf-report .b-incomparable { background: #757575; }
.pdperf-report .b-unconfirmed { background: #ef6c00; }
.pdperf-report .win { background: #e8f5e9; color: #1b5e20; font-weight: 600; }
.pdperf-report .lose { background: #fdecea; color: #b71c1c; font-weight: 600; }
.pdperf-report .even { color: #555; }
.pdperf-report .note, .pdperf-report .pdperf-nodata { color: #555; font-size: 13px; margin: 4px 0 10px; }
.pdperf-report .pdperf-nodata { border: 1px dashed #bbb; padding: 8px 10px; border-radius: 4px;
  background: #fafafa; }
.pdperf-report .charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(580px, 1fr));
  gap: 14px; }
.pdperf-report svg.pdperf-chart { width: 100%; height: auto; max-width: 760px; border: 1px solid #e5e5e5;
  border-radius: 4px; }
.pdperf-report code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; font-size: 12.5px; }
.pdperf-report details summary { cursor: pointer; color: #1f4e79; }
.pdperf-report .scroll { overflow-x: auto; max-width: 100%; }
.pdperf-report td.id { white-space: nowrap; }
.pdperf-report td.flags { min-width: 150px; max-width: 210px; }
.pdperf-report table.results { width: 100%; }
.pdperf-report table.verdicts code { overflow-wrap: anywhere; }
.pdperf-report .kv td:first-child { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; color: #333; }
"""


# --------------------------------------------------------------------------- small helpers


def _num(v: float | None, *, cls: str = "", title: str = "") -> str:
    t = f' title="{escape(title)}"' if title else ""
    return f'<td class="num {cls}"{t}>{escape(format_value(v))}</td>'


def _flag(name: str) -> str:
    """A loud badge; long snake_case names may break after their underscores."""
    return f'<span class="flag">{escape(name).replace("_", "_<wbr>")}</span>'


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _badge(word: str) -> str:
    return f'<span class="badge b-{escape(word)}">{escape(word)}</span>'


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.extend(_flatten(v, key))
            else:
                out.append((key, _scalar_text(v)))
    else:
        out.append((prefix or "value", _scalar_text(d)))
    return out


def _scalar_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_scalar_text(x) for x in v) if v else "(none)"
    if isinstance(v, dict):
        return "(none)"
    if v is None:
        return "(unset)"
    return str(v)


def _x_label(sweep_kind: str) -> str:
    return {"concurrency": "concurrency (in-flight requests)", "rate": "request rate (req/s)"}.get(
        sweep_kind, f"{sweep_kind} point")


def _topology_colors(points: Sequence[PointResult]) -> dict[str, str]:
    return {t: palette_color(i) for i, t in enumerate(sorted({p.topology for p in points}))}


def _records_digest(p: PointResult) -> str:
    h = hashlib.sha1()
    for r in p.records:
        h.update(repr((r.scheduled_s, r.first_token_s, r.end_s, r.output_tokens, r.error)).encode())
    return h.hexdigest()


def _telemetry_mean(tel: Telemetry, key: str) -> float | None:
    """A telemetry mean in seconds (a field of :class:`Telemetry`, or a key another version wrote)."""
    v = getattr(tel, key, None)
    if v is None:
        v = (tel.model_extra or {}).get(f"{key}_mean")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --------------------------------------------------------------------------- sections


def _header(run: RunData, summaries: dict[str, PointSummary]) -> str:
    r = run.run
    verdicts = run.verdicts or []
    outcomes: dict[str, int] = defaultdict(int)
    for v in verdicts:
        outcomes[v.outcome or "unknown"] += 1
    gates = [v.gate for v in verdicts if v.gate is not None]
    regressed = sum(1 for g in gates if g.status == "regressed")
    unconfirmed = sum(1 for g in gates if g.status == "unconfirmed")
    flagged = sum(1 for p in run.points if p.flags)
    failed_req = sum(summaries[p.id].requests_failed for p in run.points)
    topologies = sorted({p.topology for p in run.points})
    workloads = sorted({p.workload for p in run.points})
    parts = [_plural(len(run.points), "point"), _plural(len(topologies), "topology", "topologies"),
             _plural(len(workloads), "workload")]
    if verdicts:
        parts.append("tests: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items(),
                                                                           key=lambda kv: OUTCOME_ORDER.get(kv[0], 9))))
    if gates:
        parts.append(f"baseline gate: {regressed} regressed"
                     + (f", {unconfirmed} unconfirmed" if unconfirmed else "") + f" of {len(gates)} gated")
    if flagged:
        parts.append(f"{flagged} flagged point{'s' if flagged != 1 else ''}")
    if failed_req:
        parts.append(f"{failed_req} failed requests")
    bad = bool(outcomes.get("failed") or outcomes.get("error") or regressed or unconfirmed or flagged or failed_req
               or run.problems or not run.points)
    verdict = "needs attention" if bad else "all clear"
    meta = [("run id", run.run_id), ("started", r.get("started_at")), ("finished", r.get("finished_at")),
            ("command", r.get("command")), ("git sha", r.get("git_sha") or run.environment.git_sha)]
    rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(str(v))}</code></td></tr>"
                   for k, v in meta if v)
    return (f'<h1>pdperf run {escape(run.run_id)}</h1>'
            f'<div class="banner {"bad" if bad else "good"}"><strong>{verdict}</strong>: '
            f'{escape(" · ".join(parts))}</div><table class="kv">{rows}</table>')


def _attention(run: RunData, summaries: dict[str, PointSummary]) -> str:
    items: list[tuple[bool, str]] = []  # (loud, html)
    for msg in run.problems:
        items.append((True, escape(msg)))
    for p in run.points:
        if p.flags:
            items.append((True, f"<code>{escape(p.id)}</code>: " + " ".join(_flag(f) for f in p.flags)
                + " — this point's numbers are suspect; re-run it"))
    for v in run.verdicts or []:
        gate = v.gate
        if gate is not None and gate.status == "unconfirmed":
            items.append((True, f"<code>{escape(gate.point)}</code>: regressed, then not in its "
                                "re-measurement: this machine's run-to-run spread exceeded the gate's limit here "
                                "(details in the verdicts; both measurements are in points/)"))
    for p in run.points:
        s = summaries[p.id]
        if s.requests_failed:
            kinds = "; ".join(f"{n} {k}" + (f" ({s.error_examples[k][:120]})" if k in s.error_examples else "")
                              for k, n in sorted(s.errors.items(), key=lambda kv: -kv[1]))
            items.append((True, f"<code>{escape(p.id)}</code>: {s.requests_failed} of {s.requests} requests failed "
                                f"({escape(kinds)})"))
    low = [p.id for p in run.points if 0 < summaries[p.id].requests_ok < LOW_P99_SAMPLES]
    if low:
        items.append((False, f"{len(low)} point{'s' if len(low) > 1 else ''} with fewer than {LOW_P99_SAMPLES} "
                             f"successful requests: their p99 is close to the maximum (shown in italics); "
                             f"about 1000 requests per point make a stable p99 "
                             f"<span title=\"{escape(', '.join(low))}\">(hover for the list)</span>"))
    empty = [p.id for p in run.points if not summaries[p.id].requests_ok]
    for pid in empty:
        items.append((True, f"<code>{escape(pid)}</code>: no successful request; it has no latency numbers"))
    seen: dict[str, str] = {}
    for p in run.points:
        if not p.records:
            continue
        digest = _records_digest(p)
        if digest in seen:
            items.append((True, f"<code>{escape(seen[digest])}</code> and <code>{escape(p.id)}</code> have "
                                "identical per-request timings: one result was probably copied over the other"))
        else:
            seen[digest] = p.id
    for p in run.points:
        resets = p.telemetry.counter_resets
        if resets:
            items.append((True, f"<code>{escape(p.id)}</code>: engine counters went down during the point "
                                f"(an engine restarted?): {escape(', '.join(map(str, resets)))}"))
        scrape_errors = p.telemetry.scrape_errors
        if scrape_errors:
            items.append((False, f"<code>{escape(p.id)}</code>: telemetry scrape failed for "
                                 f"{escape(', '.join(map(str, scrape_errors)))}; server-side numbers are partial"))
    run_hw = run.environment.hardware_id
    other_hw = sorted({str(p.environment.hardware_id) for p in run.points
                       if run_hw and p.environment.hardware_id not in (None, run_hw)})
    if other_hw:
        items.append((True, f"points ran on other hardware than the run ({escape(str(run_hw))}): "
                            f"{escape(', '.join(other_hw))}"))
    if not run.points:
        items.append((True, f"no point results under {escape(str(run.run_dir / 'points'))}"))
    if not items:
        return ""
    lis = "".join(f'<li class="{"loud" if loud else ""}">{text}</li>' for loud, text in items)
    return f'<div class="attention"><strong>Needs attention</strong><ul>{lis}</ul></div>'


def _environment(run: RunData) -> str:
    env = run.environment.model_dump(exclude_none=True)
    source = "run.json" if run.run.get("environment") else "the first point (run.json has no environment)"
    if not env:
        return "<h2>Environment</h2>" + no_data("Environment", "neither run.json nor the points carry one")
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in _flatten(env))
    return (f'<h2>Environment</h2><p class="note">From {escape(source)}. Baselines compare only within one '
            f'<code>hardware_id</code>.</p><table class="kv"><tr><th>key</th><th>value</th></tr>{rows}</table>')


def _startups(run: RunData) -> str:
    """Deployment start-up and teardown per topology (GPU time users pay for), and failures."""
    rows = run.run.get("startups") or []
    if not rows:
        return ""
    body = []
    for r in rows:
        err = r.get("error")
        restarts = r.get("restarts_at_ready") or 0
        body.append(
            f"<tr><td>{escape(str(r.get('topology')))}</td><td>{escape(str(r.get('backend')))}</td>"
            f"<td>{_num(r.get('startup_s'))}</td><td>{_num(r.get('teardown_s'))}</td>"
            f"<td>{_flag(f'{restarts} restart(s)') if restarts else '0'}</td>"
            f"<td>{escape(err) if err else ''}</td></tr>")
    return ('<h2>Deployments</h2><p class="note">Seconds from submitting a topology to serving (and to torn down); '
            'replica restarts seen during start-up are flagged.</p><table><tr><th>topology</th><th>backend</th>'
            '<th>start-up s</th><th>teardown s</th><th>restarts</th><th>error</th></tr>' + "".join(body) + "</table>")


def _slo_text(item: SloResult) -> str:
    mark = "✓" if item.passed else "✗"
    cls = "" if item.passed else ' class="err"'
    observed = (f"unbounded: {item.failed_requests} failed requests" if item.failed_requests
                else f"observed {format_value(item.observed)}")
    return f"<span{cls}>{mark} {escape(item.slo)} ({escape(observed)})</span>"


def _gate_html(gate: GateResult) -> str:
    msg = gate.message() or gate.reason
    rows = "".join(f"<tr><td>{_badge(v.verdict)}</td><td>{escape(v.message())}</td></tr>" for v in gate.verdicts)
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in gate.notes)
    notes += "".join(f"<li>re-measurement {c.attempt} ({escape(c.point_file or '')}): "
                     f"{_badge(c.status)} {escape(c.message)}</li>" for c in gate.confirmations)
    details = ""
    if rows or notes:
        details = (f"<details><summary>{len(gate.verdicts)} gated metrics"
                   f"{', notes' if notes else ''}</summary><table>{rows}</table>"
                   f"{'<ul>' + notes + '</ul>' if notes else ''}</details>")
    return f"{_badge(gate.status)} {escape(str(msg))}{details}"


def _verdicts(run: RunData) -> str:
    """What ran leads (failed, then passed); skipped tests follow, one line per reason (a first run
    on a CPU machine skips every GPU topology for the same reason)."""
    head = "<h2>Verdicts: SLO and baseline gates</h2>"
    if run.verdicts is None:
        return head + no_data("Verdicts", "verdicts.json is absent: this run recorded no test outcomes")
    if not run.verdicts:
        return head + no_data("Verdicts", "verdicts.json lists no tests")
    failed: list[str] = []
    passed: list[str] = []
    skipped: dict[str, list[str]] = defaultdict(list)
    for v in sorted(run.verdicts, key=lambda v: OUTCOME_ORDER.get(v.outcome, 9)):
        if v.outcome == "skipped":
            skipped[v.reason or "skipped without a reason: the test must say why"].append(v.test_id)
            continue
        slos = "<br>".join(_slo_text(s) for s in v.slo) or '<span class="note">none</span>'
        gate_html = _gate_html(v.gate) if v.gate is not None else '<span class="note">not gated</span>'
        reason = escape(v.errored or v.reason)
        row = (f"<tr><td>{_badge(v.outcome)}</td><td><code>{escape(v.test_id)}</code></td>"
               f"<td>{reason}</td><td>{slos}</td><td>{gate_html}</td></tr>")
        (passed if v.outcome == "passed" else failed).append(row)
    header = "<tr><th>outcome</th><th>test</th><th>reason</th><th>SLOs</th><th>baseline gate</th></tr>"
    out = head
    ran = failed + passed
    if ran:
        out += f'<div class="scroll"><table class="verdicts">{header}{"".join(ran)}</table></div>'
    else:
        out += "<p>No test ran.</p>"
    if skipped:
        n = sum(len(ids) for ids in skipped.values())
        lines = "".join(f"<li>{_plural(len(ids), 'test')}: {escape(reason)}"
                        f' <span class="note" title="{escape(", ".join(ids))}">(hover for the tests)</span></li>'
                        for reason, ids in sorted(skipped.items(), key=lambda kv: -len(kv[1])))
        out += f"<details><summary>{_plural(n, 'skipped test')}, by reason</summary><ul>{lines}</ul></details>"
    return out


def _topology_tables(run: RunData, summaries: dict[str, PointSummary]) -> str:
    out = ['<h2>Results per topology</h2><p class="note">Latencies in ms from the scheduled send time; '
           'throughput over the point\'s duration; goodput counts requests that met every SLO. '
           f'<i>Italic</i> p99: fewer than {LOW_P99_SAMPLES} requests.</p>']
    by_topo = _by_topology(run.points)
    if not by_topo:
        return out[0] + no_data("Results", "no points")
    for topo, pts in by_topo.items():
        kind = topology_kind(pts[0])
        gpus = sorted({p.gpus for p in pts})
        gpu_text = ", ".join(str(g) for g in gpus) + " GPU" + ("s" if gpus != [1] else "")
        if gpus == [0]:
            gpu_text = "CPU (0 GPUs)"
        hdr1 = ["<th rowspan=2>workload</th><th rowspan=2>point</th><th rowspan=2>ok / sent</th>"]
        hdr1 += [f"<th colspan=3>{label} ms</th>" for _, label in TABLE_METRICS]
        hdr1 += ["<th rowspan=2>req/s</th><th rowspan=2>out tok/s</th><th rowspan=2>out tok/s per GPU</th>"
                 "<th rowspan=2>goodput req/s</th><th rowspan=2>errors</th><th rowspan=2>flags</th>"]
        hdr2 = "".join(f"<th>{s}</th>" for _ in TABLE_METRICS for s in TABLE_STATS)
        rows = []
        for p in pts:
            s = summaries[p.id]
            ok = s.requests_ok
            cells = [f'<td class="id">{escape(p.workload)}</td><td class="id">{escape(p.point_id)}</td>'
                     f"<td class=\"num\">{ok} / {s.requests}</td>"]
            for m, _ in TABLE_METRICS:
                for st in TABLE_STATS:
                    low = st == "p99" and 0 < ok < LOW_P99_SAMPLES
                    cells.append(_num(latency(s, m, st), cls="lowconf" if low else "",
                                      title=f"p99 from {ok} requests" if low else ""))
            per_gpu = throughput(s, "output_tok_per_s_per_gpu")
            cells += [_num(throughput(s, "req_per_s")), _num(throughput(s, "output_tok_per_s")),
                      _num(per_gpu) if (per_gpu is not None or p.gpus) else '<td class="num note">n/a (CPU)</td>',
                      _num(throughput(s, "goodput_req_per_s"))]
            errors = s.errors
            cells.append("<td class=\"err\">" + escape(", ".join(f"{k}: {n}" for k, n in sorted(errors.items())))
                         + "</td>" if errors else "<td></td>")
            cells.append('<td class="flags">' + " ".join(_flag(f) for f in p.flags) + "</td>")
            rows.append(f'<tr class="{"flagged" if p.flags else ""}">{"".join(cells)}</tr>')
        out.append(f"<h3>{escape(topo)} <span class=\"note\">{'PD' if kind == 'pd' else 'collocated'}, "
                   f"{escape(gpu_text)}{_co_resident_text(pts)}</span></h3>"
                   "<div class=\"scroll\"><table class=\"results\">"
                   f"<tr>{''.join(hdr1)}</tr>"
                   f"<tr>{hdr2}</tr>{''.join(rows)}</table></div>" + _kv_path_text(pts, kind)
                   + _gpu_clock_text(pts) + _host_cpu_text(pts))
    return "".join(out)


def _kv_path_text(pts: list[PointResult], kind: str) -> str:
    """PD topologies: per point, which transport moved the KV and how fast (pdperf.network)."""
    if kind != "pd":
        return ""
    lines = [f"<li><span class=\"id\">{escape(p.workload)} {escape(p.point_id)}</span>: "
             f"{escape(kv_path_summary(p.telemetry))}</li>" for p in pts]
    return '<p class="note">KV path (UCX\'s protocol selection, NIXL\'s metrics):</p><ul class="note">' + "".join(lines) + "</ul>"


def _gpu_clock_text(pts: list[PointResult]) -> str:
    """One line per topology: each point's SM clock range over the client host's busy GPUs, and why
    NVML held clocks (``telemetry["gpu"]``); nothing where no point carries GPU samples."""
    parts = []
    for p in pts:
        per_gpu = p.telemetry.gpu.get("per_gpu") or {}
        busy = [g for g in per_gpu.values() if g.get("sm_clock_mhz_min") is not None]
        if not busy:
            continue
        lo = min(g["sm_clock_mhz_min"] for g in busy)
        hi = max(g["sm_clock_mhz_max"] for g in busy)
        reasons = sorted({r for g in busy for r in g.get("clock_reasons_busy") or []})
        rng = f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}"
        parts.append(f"{p.point_id} {rng} MHz" + (f" ({', '.join(reasons)})" if reasons else ""))
    if not parts:
        return ""
    return ('<p class="note">GPU SM clocks while busy (the client host\'s GPUs, NVML\'s reasons for held clocks): '
            + escape("; ".join(parts)) + "</p>")


# A serving process busier than this many cores is at the limit of one Python thread holding the GIL.
ONE_CORE = 0.9
# vLLM's engine core and its TP workers: they step continuously whenever requests are in flight (a
# full core at every load on 4x H100), so being at one core says nothing about a point; their CPU's
# SMT sibling is what the host line reports for them.
ENGINE_ROLES = ("VLLM::EngineCore", "VLLM::Worker", "RayWorker")


def _host_cpu_text(pts: list[PointResult], roles_shown: int = 4) -> str:
    """One line per topology: per point, the client host's serving processes by role, cores busy /
    cores waiting for a CPU (mean over the point; the most waiting in one interval), from
    ``telemetry["host_cpu"]``; then the hypervisor's steal where above 0.01 cores, and the share of
    intervals in which a vLLM engine's (or TP worker's) logical CPU had an SMT sibling at least half
    busy, the largest over its roles, where known; nothing where no point carries any of these."""
    parts = []
    for p in pts:
        host = p.telemetry.host_cpu
        roles = host.get("roles") or {}
        steal = float(host.get("steal_cores") or 0)
        if not roles and steal <= 0.01:
            continue
        own, beside = [], [0.0, 0.0]
        for role, r in roles.items():
            app, _, name = role.rpartition("/")
            if app and app != p.topology:  # another Serve application up beside this one
                beside[0] += float(r.get("cpu_cores") or 0)
                beside[1] += float(r.get("wait_cores") or 0)
            else:
                own.append((name, r))
        top = sorted(own, key=lambda kv: -float(kv[1].get("cpu_cores") or 0))[:roles_shown]
        items = [f"{name}×{r.get('processes', 0)} {float(r.get('cpu_cores') or 0):.2f} / "
                 f"{float(r.get('wait_cores') or 0):.2f} (max {float(r.get('wait_cores_max') or 0):.2f})"
                 for name, r in top]
        if beside != [0.0, 0.0]:
            items.append(f"other applications {beside[0]:.2f} / {beside[1]:.2f}")
        full = at_one_core(host, p.topology)
        if full:
            items.append("at one core (a Python process's limit): " + ", ".join(f"{n} {c:.2f}" for n, c in full))
        if steal > 0.01:
            items.append(f"steal {steal:.2f} cores (max {float(host.get('steal_cores_max') or 0):.2f})")
        smt = [float(r["sibling_busy_frac"]) for name, r in own
               if name.startswith(ENGINE_ROLES)
               and r.get("sibling_busy_frac") is not None]
        if smt:
            items.append(f"engine CPU's SMT sibling busy in {max(smt):.0%} of intervals")
        parts.append(f"{p.point_id}: " + ", ".join(items))
    if not parts:
        return ""
    return ('<p class="note">Serving processes on the client host, cores busy / cores waiting for a CPU '
            '(mean over the point; the most waiting in one second); the hypervisor\'s steal (all CPUs, cores); '
            'the share of intervals an engine\'s CPU had an SMT sibling at least half busy: '
            + escape("; ".join(parts)) + "</p>")


def at_one_core(host: dict, topology: str) -> list[tuple[str, float]]:
    """This topology's serving processes (Serve replicas, the PD proxy, ...) at about one core:
    (role, cores), busiest first. On 4x H100 PD 1P-TP2:1D-TP2's decode replica, one process for
    all 64 streams, ran at 0.98 cores in the c64 point that decoded x1.38 slower than collocated."""
    full = []
    for proc in (host.get("processes") or {}).values():
        app, _, name = str(proc.get("role") or "").rpartition("/")
        cores = float(proc.get("cpu_cores") or 0)
        if cores >= ONE_CORE and (not app or app == topology) and not name.startswith(ENGINE_ROLES):
            full.append((name, cores))
    return sorted(full, key=lambda nc: -nc[1])


def _co_resident_text(pts: list[PointResult]) -> str:
    """", measured beside X" when other deployments of the pool were up during the points
    (environment ``co_resident``); points of one topology measured alone and beside others say both."""
    seen = {p.environment.co_resident or "" for p in pts}
    beside = sorted(seen - {""})
    if not beside:
        return ""
    alone = " (some points alone)" if "" in seen else ""
    return escape(f", measured beside {' / '.join(b.replace(',', ', ') for b in beside)}{alone}")


def _by_topology(pts: Iterable[PointResult]) -> dict[str, list[PointResult]]:
    out: dict[str, list[PointResult]] = defaultdict(list)
    for p in pts:
        out[p.topology].append(p)
    return out


def _groups(points: Iterable[PointResult]) -> dict[tuple[str, str], list[PointResult]]:
    groups: dict[tuple[str, str], list[PointResult]] = defaultdict(list)
    for p in points:
        groups[(p.workload, p.sweep_kind)].append(p)
    return groups


def _latency_chart(pts: list[PointResult], summaries: dict[str, PointSummary], colors: dict[str, str], metric: str,
                   label: str, workload: str, sweep_kind: str) -> str:
    series = []
    by_topo = _by_topology(pts)
    for topo, tp in sorted(by_topo.items()):
        tp = sorted(tp, key=lambda p: p.point_value)
        xs = [p.point_value for p in tp]
        for stat, dashed in (("p50", False), ("p99", True)):
            series.append(Series(f"{topo} {stat}", xs, [latency(summaries[p.id], metric, stat) for p in tp],
                                 color=colors[topo], dashed=dashed, point_labels=[p.point_id for p in tp]))
    legend = [LegendItem(t, colors[t]) for t in sorted(by_topo)]
    legend += [LegendItem("median (p50)", "#555"), LegendItem("p99", "#555", dashed=True)]
    return line_chart(series, title=f"{label}: median and p99 vs load — {workload}", x_label=_x_label(sweep_kind),
                      y_label=f"{label} (ms)", legend=legend, x_ticks_at_data=True)


def _pace_chart(pts: list[PointResult], workload: str) -> str:
    """Each measured request's TPOT against when it was sent, one line per load point of one
    topology: a slow stretch within a point (on 4x H100 a third of a point's requests decoded at
    ~33 ms per token instead of ~20) shows as a step, which the point's percentiles hide. Look
    here before accepting a baseline."""
    series = []
    for i, p in enumerate(sorted(pts, key=lambda p: p.point_value)):
        sent = sorted((r.sent_s, r) for r in p.records if r.ok and not r.warmup and r.sent_s is not None)
        pace = [(t, r, v) for t, r in sent if (v := metrics.tpot_ms(r)) is not None]
        if not pace:
            continue
        t0 = pace[0][0]
        series.append(Series(p.point_id, [t - t0 for t, _, _ in pace], [v for _, _, v in pace],
                             color=palette_color(i), width=1.0,
                             point_labels=[f"{p.point_id}: request {r.index}" for _, r, _ in pace]))
    topology = pts[0].topology if pts else ""
    return line_chart(series, title=f"TPOT per request in time — {topology} — {workload}",
                      x_label="seconds since the point's first measured request", y_label="TPOT (ms)",
                      log_x=False, legend=[LegendItem(s.label, s.color) for s in series])


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both lower x (latency) and higher y (throughput), by increasing x."""
    front: list[tuple[float, float]] = []
    best_y = float("-inf")
    for x, y in sorted(points, key=lambda xy: (xy[0], -xy[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def _pareto_chart(pts: list[PointResult], summaries: dict[str, PointSummary], colors: dict[str, str], workload: str) -> str:
    per_gpu = all(p.gpus > 0 for p in pts)
    key = "output_tok_per_s_per_gpu" if per_gpu else "output_tok_per_s"
    y_label = "output tokens/s per GPU" if per_gpu else "output tokens/s (total: CPU points have no GPUs)"
    title = f"Throughput{' per GPU' if per_gpu else ''} vs median TPOT — {workload}"
    by_topo = _by_topology(pts)
    series, xy = [], []
    for topo, tp in sorted(by_topo.items()):
        tp = sorted(tp, key=lambda p: p.point_value)
        xs = [latency(summaries[p.id], "tpot_ms", "p50") for p in tp]
        ys = [throughput(summaries[p.id], key) for p in tp]
        keep = [(x, y, p.point_id) for x, y, p in zip(xs, ys, tp) if x is not None and y is not None]
        if not keep:
            continue
        xy += [(x, y) for x, y, _ in keep]
        series.append(Series(topo, [k[0] for k in keep], [k[1] for k in keep], color=colors[topo],
                             point_labels=[k[2] for k in keep], annotate=True))
    if not series:
        return no_data(title, "no point has both a TPOT and a throughput")
    front = _pareto_front(xy)
    frontier = Series("Pareto frontier", [x for x, _ in front], [y for _, y in front], color="#d0d0d0", width=9,
                      markers=False)
    legend = [LegendItem(s.label, s.color) for s in series] + [LegendItem("Pareto frontier", "#bdbdbd")]
    return line_chart([frontier, *series], title=title, x_label="median TPOT (ms), lower is better",
                      y_label=y_label, legend=legend)


def _attribution_chart(pts: list[PointResult], workload: str) -> str:
    title = f"Server-side latency attribution (means) — {workload}"
    rows: list[Any] = []
    bounds: dict[str, tuple[float, float]] = {}
    for p in pts:
        vals = {k: _telemetry_mean(p.telemetry, k) for k in TELEMETRY_SEGMENTS}
        if any(v is not None for v in vals.values()):
            guessed = [k for k in TELEMETRY_SEGMENTS if k in p.telemetry.estimated_means]
            rows.append((f"{p.topology} {p.point_id}{' ≈' if guessed else ''}",
                         {k: (v or 0.0) * 1000.0 for k, v in vals.items()}))
            for k in guessed:  # the widest proven range of each segment over the points (None: no upper bound)
                lo, hi = p.telemetry.mean_bounds(k) or (0.0, None)
                old = bounds.get(k, (math.inf, -math.inf))
                bounds[k] = (min(old[0], lo or 0.0), max(old[1], math.inf if hi is None else hi))
    if not rows:
        return no_data(title, "the points carry no telemetry means of " + ", ".join(TELEMETRY_SEGMENTS))
    chart = stacked_bar_chart(rows, TELEMETRY_SEGMENTS, title=title, x_label="mean time per request (ms)",
                              segment_labels=TELEMETRY_LABELS)
    return chart + _estimated_note(bounds) + _short_window_note(pts)


def short_windows(pts: list[PointResult]) -> list[tuple[PointResult, int, int]]:
    """Points whose engines counted under 90% of the requests the client completed in the window:
    (point, counted, expected). Each engine a request passes counts it (PD: prefill and decode)."""
    out = []
    for p in pts:
        counted = p.telemetry.server_requests
        ok = p.summary.requests_ok
        if not isinstance(counted, (int, float)) or not ok:
            continue
        expected = int(ok) * (2 if topology_kind(p) == "pd" else 1)
        if counted < 0.9 * expected:
            out.append((p, int(counted), expected))
    return out


def _short_window_note(pts: list[PointResult]) -> str:
    """On 4x H100 the engines counted 438 of colloc-2xtp2 c64's 512 requests: Ray exported metrics
    every 10 s, so the closing scrape missed the last seconds. Said under the chart, not hidden."""
    short = short_windows(pts)
    if not short:
        return ""
    listed = ", ".join(f"{p.topology} {p.point_id} {n} of {e}" for p, n, e in short)
    return ('<p class="note">The engines counted fewer requests than the point completed ('
            + escape(listed) + "): their numbers cover only part of its window. Through Ray, start the nodes with "
            "RAY_metrics_report_interval_ms=1000 (Ray exports every 10 s by default; docs/SETUP.md).</p>")


def _estimated_note(bounds: dict[str, tuple[float, float]]) -> str:
    """Under the attribution chart: which means are estimates from histogram buckets (Ray's
    metrics export keeps no sums) and the range each is proven to lie in."""
    if not bounds:
        return ""
    def ms(v: float) -> str:
        return "no upper bound" if math.isinf(v) else f"{v * 1000:,.0f} ms"
    ranges = ", ".join(f"{TELEMETRY_LABELS.get(k, k)} {ms(lo)}-{ms(hi)}" for k, (lo, hi) in bounds.items())
    return ('<p class="note">≈: estimated from histogram buckets — the metrics export (Ray\'s) keeps no sums and '
            "counts each request at its bucket's midpoint, so these bars are known only to within their buckets: "
            f"{escape(ranges)} (the widest range over the points). Client-side TTFT and TPOT above are exact.</p>")


def _plots(run: RunData, summaries: dict[str, PointSummary]) -> str:
    out = ["<h2>Plots</h2>"]
    if not run.points:
        return out[0] + no_data("Plots", "no points")
    colors = _topology_colors(run.points)
    for (workload, sweep_kind), pts in sorted(_groups(run.points).items()):
        charts = [
            _latency_chart(pts, summaries, colors, "ttft_ms", "TTFT", workload, sweep_kind),
            _latency_chart(pts, summaries, colors, "tpot_ms", "TPOT", workload, sweep_kind),
            _pareto_chart(pts, summaries, colors, workload),
            _attribution_chart(pts, workload),
            *(_pace_chart(tp, workload) for _, tp in sorted(_by_topology(pts).items())),
        ]
        out.append(f"<h3>{escape(workload)} <span class=\"note\">{escape(sweep_kind)} sweep</span></h3>"
                   f"<div class=\"charts\">{''.join(charts)}</div>")
    return "".join(out)


def _compare_cell(pd_v: float | None, co_v: float | None, pd_ci: Any = None, co_ci: Any = None, *,
                  higher_better: bool = False) -> tuple[str, str]:
    """(html cell, outcome) where outcome is win | lose | even | n/a, from PD's point of view."""
    if pd_v is None or co_v is None or co_v == 0:
        return '<td class="num note">n/a</td>', "n/a"
    ratio = pd_v / co_v
    decisive = None
    if pd_ci and co_ci:
        decisive = pd_ci[1] < co_ci[0] or co_ci[1] < pd_ci[0]  # p99 intervals do not overlap
    better = ratio > 1 if higher_better else ratio < 1
    if decisive is None:
        decisive = abs(ratio - 1) > EVEN_BAND
    outcome = "even" if not decisive else ("win" if better else "lose")
    title = (f"PD {format_value(pd_v)} vs collocated {format_value(co_v)}"
             + ("" if decisive else ": within noise"))
    return (f'<td class="num {outcome}" title="{escape(title)}">{escape(format_value(pd_v))} / '
            f'{escape(format_value(co_v))} (x{ratio:.2f})</td>', outcome)


_PAIR_METRICS = (("p99 TPOT", "tpot_ms", "p99"), ("p99 ITL", "itl_ms", "p99"), ("median TTFT", "ttft_ms", "p50"),
                 ("p99 TTFT", "ttft_ms", "p99"))


def _tally(outcome: str, name: str, pid: str, wins: dict[str, list[str]], losses: dict[str, list[str]]) -> None:
    if outcome == "win":
        wins[name].append(pid)
    elif outcome == "lose":
        losses[name].append(pid)


def _pd_vs_collocated(run: RunData, summaries: dict[str, PointSummary]) -> str:
    head = ("<h2>PD vs collocated at equal GPU count</h2><p class=\"note\">Each cell: PD / collocated (ratio). "
            "Green: PD better, red: PD worse, grey: within noise (p99 intervals overlap, or within "
            f"±{EVEN_BAND * 100:.0f}% where there is no interval). Pairs need the same workload and GPU count; "
            "PD usually wins on decode (TPOT, ITL tails) and pays on TTFT (the KV transfer).</p>")
    by_key: dict[tuple[str, int, str], dict[str, dict[str, PointResult]]] = defaultdict(lambda: defaultdict(dict))
    for p in run.points:
        by_key[(p.workload, p.gpus, topology_kind(p))][p.topology][p.point_id] = p
    blocks = []
    pd_keys = [k for k in by_key if k[2] == "pd"]
    for workload, gpus, _ in sorted(pd_keys):
        collocated = by_key.get((workload, gpus, "collocated"), {})
        for pd_topo, pd_pts in sorted(by_key[(workload, gpus, "pd")].items()):
            for co_topo, co_pts in sorted(collocated.items()):
                common = sorted(set(pd_pts) & set(co_pts), key=lambda pid: pd_pts[pid].point_value)
                if not common:
                    continue
                rows = []
                wins: dict[str, list[str]] = defaultdict(list)
                losses: dict[str, list[str]] = defaultdict(list)
                for pid in common:
                    ps, cs = summaries[pd_pts[pid].id], summaries[co_pts[pid].id]
                    cells = [f"<td>{escape(pid)}</td>"]
                    for name, m, st in _PAIR_METRICS:
                        pd_ci = ps.metrics[m].p99_ci if st == "p99" and m in ps.metrics else None
                        co_ci = cs.metrics[m].p99_ci if st == "p99" and m in cs.metrics else None
                        cell, outcome = _compare_cell(latency(ps, m, st), latency(cs, m, st), pd_ci, co_ci)
                        cells.append(cell)
                        _tally(outcome, name, pid, wins, losses)
                    tkey = "output_tok_per_s_per_gpu" if gpus else "output_tok_per_s"
                    cell, outcome = _compare_cell(throughput(ps, tkey), throughput(cs, tkey), higher_better=True)
                    cells.append(cell)
                    _tally(outcome, "throughput", pid, wins, losses)
                    rows.append("<tr>" + "".join(cells) + "</tr>")
                win_text = "; ".join(f"{k} at {', '.join(v)}" for k, v in wins.items()) or "nothing"
                lose_text = "; ".join(f"{k} at {', '.join(v)}" for k, v in losses.items()) or "nothing"
                gpu_text = f"{gpus} GPUs" if gpus else "CPU, 0 GPUs"
                tput = "out tok/s per GPU" if gpus else "out tok/s"
                blocks.append(
                    f"<h3>{escape(pd_topo)} vs {escape(co_topo)} <span class=\"note\">{escape(workload)}, "
                    f"{gpu_text}</span></h3><p><span class=\"win\">PD wins</span> on {escape(win_text)}. "
                    f"<span class=\"lose\">PD loses</span> on {escape(lose_text)}.</p>"
                    f"<table><tr><th>point</th><th>p99 TPOT ms</th><th>p99 ITL ms</th><th>median TTFT ms</th>"
                    f"<th>p99 TTFT ms</th><th>{tput}</th></tr>{''.join(rows)}</table>")
    if not blocks:
        pd_t = sorted({f"{p.topology} ({p.gpus} GPUs)" for p in run.points if topology_kind(p) == "pd"})
        co_t = sorted({f"{p.topology} ({p.gpus} GPUs)" for p in run.points if topology_kind(p) == "collocated"})
        return head + no_data("PD vs collocated", "no PD and collocated topology share a workload, a GPU count "
                              f"and a load point (PD: {', '.join(pd_t) or 'none'}; collocated: "
                              f"{', '.join(co_t) or 'none'})")
    return head + "".join(blocks)


def _baseline_section(run: RunData, gate_mdes: dict[str, list[Mde]] | None = None) -> str:
    gates = [v.gate for v in (run.verdicts or []) if v.gate is not None]
    if not gates:
        return ""
    rows = []
    for g in gates:
        for v in g.verdicts:
            ratio, ci, t = v.ratio, v.ratio_ci, v.threshold
            if ratio is None or not t:
                continue
            hi, lo = 1 + t, 1 / (1 + t)
            base, b_lo, b_hi = v.baseline_value, v.band_low, v.band_high
            if v.band_runs and base and b_lo and b_hi:  # limits from the band's worst / best run
                hi, lo = b_hi / base * hi, b_lo / base * lo  # either direction: the upper limit from the band's top
            bad, good = (hi, lo) if v.direction == "lower-is-better" else (lo, hi)
            rows.append(RatioRow(f"{g.point} {v.statistic} {v.metric}", ratio,
                                 ci[0] if ci else None, ci[1] if ci else None, bad, good, v.verdict,
                                 tooltip=v.message()))
    statuses: dict[str, int] = defaultdict(int)
    for g in gates:
        statuses[g.status] += 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(statuses.items()))
    shown, hidden = trim_ratio_rows(rows)
    chart = ratio_chart(shown, title="Baseline gate: current / baseline with interval") if rows else no_data(
        "Baseline gate", "no gated metric had a ratio (baselines missing or incomparable)")
    if hidden:
        chart += f'<p class="note">{hidden} smaller unchanged ratios not drawn; the verdicts table lists all.</p>'

    return (f"<h2>Baseline gate</h2><p class=\"note\">{escape(summary)}. Regressed = significant "
            "(Mann-Whitney p &lt; alpha and interval excluding 1) and beyond the metric's limit "
            "(baselines/thresholds.yaml); see docs/METHODOLOGY.md.</p>" + chart + _mde_table(run, gate_mdes))


#: The report's MDE columns: gate key and heading.
_MDE_COLUMNS = (("p50 tpot_ms", "TPOT p50"), ("p50 ttft_ms", "TTFT p50"), ("mean e2e_ms", "E2E mean (throughput)"))


def _mde_cell(m: Mde | None) -> str:
    if m is None:
        return '<td class="note">not gated</td>'
    fa = f"; false alarm {m.false_alarm * 100:.1f}% of unchanged runs" if m.false_alarm is not None else ""
    title = escape(f"{m.key}: limit +{m.limit * 100:.0f}%{fa}; {m.detail or m.why}", quote=True)
    cls = "" if m.catches(TARGET_CHANGE) else " lose"
    return (f'<td class="num{cls}" title="{title}">{escape(m.text())} '
            f'<span class="note">{escape(m.why)}</span></td>')


def _mde_table(run: RunData, gate_mdes: dict[str, list[Mde]] | None) -> str:
    """Per gated point: the MDE of TPOT p50, TTFT p50 and E2E mean, and why it cannot catch a 10 %
    regression when it cannot (pdperf.gate.mde; empty without baselines to simulate from)."""
    if gate_mdes is None:
        return ""
    head = (f"<h3>What the gate can detect</h3><p class=\"note\">Minimum detectable regression (MDE): the "
            f"smallest slowdown each gate flags as regressed in {POWER:.0%} of simulated runs of the point at its "
            "request count, against its baseline and band (docs/METHODOLOGY.md, \"What the gate can detect\"). "
            f"E2E mean is the throughput gate: {escape(LITTLE_NOTE)}. Hover a cell for the limit, the "
            "false-alarm rate and the band.</p>")
    if not gate_mdes:
        return head + no_data("What the gate can detect", "no gated point has a baseline to simulate from")
    kinds = {p.id: p.sweep_kind for p in run.points}
    rows = []
    for point, mdes in gate_mdes.items():
        by_key = {m.key: m for m in mdes}
        cells = "".join(_mde_cell(by_key.get(key)) for key, _ in _MDE_COLUMNS)
        warnings = mde_warnings(mdes, sweep_kind=kinds.get(point, "concurrency"))
        warn = "<br>".join(f'<span class="err">{escape(w)}</span>' for w in warnings)
        requests = max((m.requests for m in mdes), default=0)
        rows.append(f'<tr><td class="id">{escape(point)}</td><td class="num">{requests}</td>{cells}'
                    f"<td>{warn}</td></tr>")
    header = "".join(f"<th>{escape(label)}</th>" for _, label in _MDE_COLUMNS)
    return (head + f'<div class="scroll"><table><tr><th>point</th><th>requests</th>{header}'
            f"<th>cannot catch {TARGET_CHANGE * 100:.0f}%</th></tr>{''.join(rows)}</table></div>")


#: The planner's metrics as the report's table shows them: (metric, heading).
PLANNER_COLUMNS = (("med_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("med_tpot_ms", "TPOT p50 ms"),
                   ("out_tok_s", "out tok/s"))


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.1f}%"


def _predicted_cells(row: PredictedPoint, metric: str) -> str:
    """predicted [interval], measured, error; the error is red when the measurement is outside the interval."""
    cmp = row.comparison
    assert cmp is not None
    pred = cmp.predicted.prediction.metric(metric)
    iv = cmp.predicted.interval(metric)
    meas = cmp.measured.value(metric)
    err = cmp.error_pct(metric)
    within = cmp.within_interval(metric)
    interval = (f' <span class="note">[{escape(format_value(iv.lo))}–{escape(format_value(iv.hi))}]</span>'
                if math.isfinite(iv.lo) and math.isfinite(iv.hi) and iv.hi > iv.lo else "")
    cls = " lose" if within is False else ""
    title = ("measured outside the interval" if within is False else
             "measured inside the interval" if within else "no measured value")
    return (f'<td class="num">{escape(format_value(pred))}{interval}</td>{_num(meas)}'
            f'<td class="num{cls}" title="{escape(title)}">{escape(_pct(err))}</td>')


def _planner_group(group: ProfileGroup, section: PlannerSection) -> str:
    who = f"{group.hardware_id or 'unknown hardware'} / {group.model or 'unknown model'}"
    if group.profile is None:
        make = ""
        if group.calibratable:
            make = (" Make one from GPU runs of this hardware and model: "
                    f"<code>{escape(section.calibrate_command(group))}</code> (docs/PLANNER.md); predictions for "
                    "the configurations it was fitted from are in-sample.")
        looked = f" (looked for <code>{escape(str(group.path))}</code>)" if group.path is not None else ""
        return (f'<p class="pdperf-nodata"><strong>{escape(who)}</strong>: {escape(group.problem or "no profile")}'
                f"{looked}.{make}</p>")
    prof = group.profile
    cal = prof.calibration
    about = f"profile <code>{escape(str(group.path))}</code>"
    if cal is not None:
        loco = ", ".join(f"{label.removesuffix(' ms')} {q.leave_one_config_out_mdape:.0f}%"
                         for metric, label in PLANNER_COLUMNS
                         for q in (cal.quality.get(metric),)
                         if q is not None and q.leave_one_config_out_mdape is not None)
        about += (f": fitted to {cal.points} points of {escape(', '.join(cal.configs))}"
                  + (f" ({escape(prof.created_at)})" if prof.created_at else "")
                  + (f"; its leave-one-config-out error (median): {escape(loco)}" if loco else ""))
    medians = [(label, group.median_abs_error_pct(metric)) for metric, label in PLANNER_COLUMNS]
    shown = [f"{label.removesuffix(' ms')} {v:.1f}%" for label, v in medians if v is not None]
    predicted = sum(1 for r in group.points if r.comparison is not None)
    median_text = (f" Median |error| on this run's {_plural(predicted, 'predicted PD point')}: "
                   f"{escape(', '.join(shown))}." if shown else "")
    rows = []
    for row in group.points:
        if row.comparison is None:
            rows.append(f'<tr><td class="id">{escape(row.point_id)}</td>'
                        f'<td colspan="{3 * len(PLANNER_COLUMNS) + 2}" class="note">{escape(row.problem or "")}'
                        "</td></tr>")
            continue
        cells = "".join(_predicted_cells(row, metric) for metric, _ in PLANNER_COLUMNS)
        notes = list(row.comparison.predicted.extrapolations)
        if row.in_calibration:
            notes.insert(0, "in calibration (in-sample)")
        rows.append(f'<tr><td class="id">{escape(row.point_id)}</td>{cells}'
                    f"<td>{escape(row.comparison.predicted.prediction.bottleneck)}</td>"
                    f'<td class="note">{escape("; ".join(notes))}</td></tr>')
    head1 = "".join(f"<th colspan=3>{escape(label)}</th>" for _, label in PLANNER_COLUMNS)
    head2 = "<th>predicted [interval]</th><th>measured</th><th>error</th>" * len(PLANNER_COLUMNS)
    return (f"<h3>{escape(who)}</h3><p class=\"note\">{about}.{median_text}</p>"
            f'<div class="scroll"><table><tr><th rowspan=2>point</th>{head1}<th rowspan=2>bottleneck</th>'
            f"<th rowspan=2>notes</th></tr><tr>{head2}</tr>{''.join(rows)}</table></div>")


def _predicted_vs_measured(section: PlannerSection | None) -> str:
    """Each PD point beside the planner's prediction from its hardware and model's profile."""
    if section is None:
        return ""
    head = "<h2>Predicted vs measured (planner)</h2>"
    if any(g.profile is not None for g in section.groups):
        head += ("<p class=\"note\">Each PD point against the planner's prediction from the profile of its "
                 "hardware and model (docs/PLANNER.md). Error = predicted / measured − 1; the interval is the "
                 f"profile's {section.level:.0%} interval, and an error in red means the measurement fell outside "
                 "it.</p>")
    return head + "".join(_planner_group(g, section) for g in section.groups)


# --------------------------------------------------------------------------- entry points


def render_fragment(run: RunData, *, gate_mdes: dict[str, list[Mde]] | None = None,
                    planner: PlannerSection | None = None) -> str:
    """The report body (no ``<html>`` wrapper), scoped under ``div.pdperf-report`` with its own CSS;
    ``gate_mdes``: per gated point, what its gate can detect; ``planner``: the PD points against the
    planner's predictions (both from pdperf.report.build_report)."""
    summaries = {p.id: point_summary(p) for p in run.points}
    sections = [
        _header(run, summaries),
        _attention(run, summaries),
        _verdicts(run),
        _topology_tables(run, summaries),
        _plots(run, summaries),
        _pd_vs_collocated(run, summaries),
        _predicted_vs_measured(planner),
        _baseline_section(run, gate_mdes),
        _startups(run),
        _environment(run),
        f'<p class="note">Written by pdperf {escape(__version__)}. Per-point numbers: <code>results.csv</code>; '
        f'raw requests: <code>points/*.json</code>. Metric definitions: docs/METHODOLOGY.md.</p>',
    ]
    return f'<div class="pdperf-report"><style>{CSS}</style>{"".join(sections)}</div>'


def render_document(run: RunData, *, gate_mdes: dict[str, list[Mde]] | None = None,
                    planner: PlannerSection | None = None) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>pdperf run {escape(run.run_id)}</title>"
            "<style>body { margin: 0 auto; max-width: 1260px; padding: 8px 12px 40px; background: #fff; }</style>"
            f"</head><body>{render_fragment(run, gate_mdes=gate_mdes, planner=planner)}</body></html>\n")



def point_fragment(r: PointResult) -> str:
    """One measured point as a small HTML table (pytest-html's extras beside the test that measured it)."""
    s = r.summary
    rows = []
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms"):
        d = s.metrics.get(metric)
        cells = "".join(f"<td>{v:.1f}</td>" if v is not None else "<td>-</td>"
                        for v in ((d.stat(k) if d else None) for k in ("p50", "p90", "p99", "mean")))
        rows.append(f"<tr><th>{escape(metrics.METRICS[metric].label)} ms</th>{cells}<td>{d.n if d else 0}</td></tr>")
    flags = f"<p style='color:#b00'><b>flags: {escape(', '.join(r.flags))}</b></p>" if r.flags else ""
    if r.environment.co_resident:
        flags += f"<p>measured beside {escape(r.environment.co_resident)}</p>"
    return (f"<div><b>{escape(r.id)}</b>: {s.requests_ok}/{s.requests} ok, "
            f"{s.throughput.output_tok_per_s:.1f} out tok/s, {s.throughput.req_per_s:.2f} req/s{flags}"
            "<table border=1 cellpadding=3><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>mean</th><th>n</th>"
            f"</tr>{''.join(rows)}</table></div>")
