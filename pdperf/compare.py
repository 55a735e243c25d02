"""Compare runs: ``python -m pdperf.compare A B [C ...]`` or ``python -m pdperf.compare RUN --baseline``.

The question after every change to a cluster, an engine flag or a version is "did it get
slower, and is that real?". This answers it from files alone, with the same statistics
and thresholds as the baseline gate (pdperf.gate): for each point id that A and B
share, and each gated metric, the ratio B/A with its bootstrap interval, the Mann-Whitney
p-value and a verdict. A is the reference; B, C ... are each compared to it. Two point
files with different ids are compared directly (e.g. a PD point against a collocated one);
``--across-topologies`` pairs two run folders' points by workload and load point instead of
id, for a run of one topology against a run of another (PD against collocated, point by point).

``--baseline`` compares each given run against the stored baselines of its own hardware.

Exit status: 0 nothing regressed, 1 something regressed (so CI can gate on it), 2 bad
input (a missing path, a file that is not a result, a schema mismatch), with one line on
stderr and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from pdperf.errors import PdperfError
from pdperf.gate.store import new_entry
from pdperf.gate.thresholds import BASELINE_ROOT, THRESHOLDS_PATH, Thresholds, load_thresholds
from pdperf.gate.verdicts import GateResult, compare_point, gate_point
from pdperf.report.html import CSS
from pdperf.report.plots import RatioRow, ratio_chart, trim_ratio_rows
from pdperf.report.rundata import ReportError, load_point_file, load_run
from pdperf.results import PointResult, atomic_write_text
from pdperf.stats import format_p_value, format_value

PROG = "python -m pdperf.compare"


@dataclass
class Input:
    path: Path
    points: dict[str, PointResult]
    single_file: bool


def load_input(path: Path) -> Input:
    """A run folder (its points/*.json) or one point JSON file; ReportError when it is neither."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such file or folder; pass a run folder (reports/<run-id>) or a point JSON")
    if path.is_dir():
        run = load_run(path, strict=True)
        return Input(path, {p.id: p for p in run.points}, False)
    p = load_point_file(path)
    return Input(path, {p.id: p}, True)


def _by_load_point(inp: Input) -> dict[tuple[str, str], PointResult]:
    """The input's points keyed by (workload, load point), its topology left out; ReportError when
    two topologies of the input share a key (which one to pair would be a guess)."""
    out: dict[tuple[str, str], PointResult] = {}
    for p in inp.points.values():
        key = (p.workload, p.point_id)
        if key in out:
            raise ReportError(f"{inp.path}: both {out[key].id} and {p.id} are at {key[0]}/{key[1]}; "
                              "--across-topologies pairs runs of one topology each: pass point files, or split the run")
        out[key] = p
    return out


def compare_inputs(reference: Input, other: Input, thresholds: Thresholds, *,
                   allow_cross_hardware: bool = False, across_topologies: bool = False) -> list[GateResult]:
    """Gate every point of ``other`` against the point with the same id in ``reference``, or with
    ``across_topologies`` the same workload and load point (a PD run against a collocated one)."""
    if across_topologies:
        ref_points, other_points = _by_load_point(reference), _by_load_point(other)
        pairs = [(p, ref_points[key]) for key, p in other_points.items() if key in ref_points]
    else:
        pairs = [(other.points[pid], reference.points[pid]) for pid in other.points if pid in reference.points]
    if not pairs and reference.single_file and other.single_file:
        pairs = [(next(iter(other.points.values())), next(iter(reference.points.values())))]
    if not pairs:
        hint = ("compare runs of the same workloads and load points" if across_topologies else
                "compare runs of the same topologies and workloads, or pass --across-topologies to pair "
                "points by workload and load point (a PD run against a collocated one)")
        raise ReportError(f"{other.path} and {reference.path} share no point id (e.g. {next(iter(other.points), '-')} "
                          f"vs {next(iter(reference.points), '-')}); {hint}")
    results = []
    for cur, ref in pairs:
        entry = new_entry(ref)
        result = compare_point(cur, entry, ref.environment, thresholds, allow_cross_hardware=allow_cross_hardware)
        if cur.id != ref.id:
            result.point = f"{cur.id} vs {ref.id}"
        if result.status == "incomparable":
            result.reason += "; pass --allow-cross-hardware to see the numbers anyway"
        results.append(result)
    return results


def format_table(results: Sequence[GateResult]) -> str:
    """A plain-text table: one row per point and gated metric, or per point when nothing was compared."""
    header = ("point", "metric", "baseline", "current", "ratio", "CI", "p", "limit", "verdict")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for r in results:
        if not r.verdicts:
            rows.append((r.point, "-", "", "", "", "", "", "", r.status))
            notes.append(f"{r.point}: {r.reason}")
            continue
        for v in r.verdicts:
            ci = f"{v.ratio_ci[0]:.2f}-{v.ratio_ci[1]:.2f}" if v.ratio_ci else ""
            if ci and v.request_ratio is not None:  # the interval is the median request's ratio's
                ci += f" (median request x{v.request_ratio:.2f})"
            limit = f"+{v.threshold * 100:.0f}%" if v.threshold else ""
            if limit and v.band_runs:  # measured from the band's worst run
                limit += f" of worst of {v.band_runs} runs ({format_value(v.band_low)}-{format_value(v.band_high)})"
            rows.append((r.point, f"{v.statistic} {v.metric}", format_value(v.baseline_value),
                         format_value(v.current_value), f"x{v.ratio:.2f}" if v.ratio is not None else "", ci,
                         format_p_value(v.p_value) if v.p_value is not None else "", limit, v.verdict))
            if v.verdict in ("regressed", "improved", "insufficient"):
                notes.append(f"{r.point}: {v.message()}")
        notes.extend(f"{r.point}: note: {n}" for n in r.notes)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def _status_counts(results: Sequence[GateResult]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def render_html(sections: Sequence[tuple[str, Sequence[GateResult]]]) -> str:
    """A standalone page: per comparison, a ratio chart and the table of verdicts."""
    body = ['<h1>pdperf comparison</h1><p class="note">Ratio = current / reference; a regression is significant '
            '(Mann-Whitney p &lt; alpha and interval excluding 1) and beyond the limit of baselines/thresholds.yaml.'
            '</p>']
    for title, results in sections:
        rows = []
        table = []
        for r in results:
            for v in r.verdicts:
                if v.ratio is not None and v.threshold:
                    hi, lo = 1 + v.threshold, 1 / (1 + v.threshold)
                    bad, good = (hi, lo) if v.direction == "lower-is-better" else (lo, hi)
                    rows.append(RatioRow(f"{r.point} {v.statistic} {v.metric}", v.ratio,
                                         v.ratio_ci[0] if v.ratio_ci else None, v.ratio_ci[1] if v.ratio_ci else None,
                                         bad, good, v.verdict, tooltip=v.message()))
                table.append(f'<tr><td><code>{escape(r.point)}</code></td><td>'
                             f'<span class="badge b-{escape(v.verdict)}">{escape(v.verdict)}</span></td>'
                             f'<td>{escape(v.message())}</td></tr>')
            if not r.verdicts:
                table.append(f'<tr><td><code>{escape(r.point)}</code></td><td><span class="badge b-{escape(r.status)}">'
                             f'{escape(r.status)}</span></td><td>{escape(r.reason)}</td></tr>')
        body.append(f"<h2>{escape(title)}</h2><p>{escape(_status_counts(results))}</p>")
        shown, hidden = trim_ratio_rows(rows)
        body.append(ratio_chart(shown, title=f"current / reference — {title}"))
        if hidden:
            body.append(f'<p class="note">{hidden} smaller unchanged ratios not drawn; the table lists all.</p>')
        body.append("<table><tr><th>point</th><th>verdict</th><th>detail</th></tr>" + "".join(table) + "</table>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>pdperf comparison</title>'
            '<style>body { margin: 0 auto; max-width: 1260px; padding: 8px 12px 40px; }</style></head><body>'
            f'<div class="pdperf-report"><style>{CSS}</style>{"".join(body)}</div></body></html>\n')


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1].replace("\n", " "))
    ap.add_argument("inputs", nargs="+", type=Path, metavar="RUN_DIR_OR_POINT_JSON",
                    help="the reference first, then what to compare to it")
    ap.add_argument("--baseline", action="store_true", help="compare each input against the stored baselines "
                    "of its hardware instead of against the first input")
    ap.add_argument("--baselines-dir", type=Path, default=BASELINE_ROOT, help="baseline store (default: %(default)s)")
    ap.add_argument("--thresholds", type=Path, default=THRESHOLDS_PATH, help="default: %(default)s")
    ap.add_argument("--allow-cross-hardware", action="store_true",
                    help="show numbers even when the hardware_id differs (never used by the gate)")
    ap.add_argument("--across-topologies", action="store_true",
                    help="pair points by workload and load point, not by id: each input's one topology against "
                         "the reference's (e.g. a PD run folder against a collocated one)")
    ap.add_argument("--html", type=Path, metavar="OUT", help="also write an HTML page with a ratio chart")
    args = ap.parse_args(argv)
    if not args.baseline and len(args.inputs) < 2:
        print(f"{prog}: give a reference and at least one input to compare to it, or use --baseline",
              file=sys.stderr)
        return 2
    try:
        thresholds = load_thresholds(args.thresholds)
        inputs = [load_input(p) for p in args.inputs]
        sections: list[tuple[str, list[GateResult]]] = []
        if args.baseline:
            for inp in inputs:
                results = [gate_point(args.baselines_dir, p, thresholds) for p in inp.points.values()]
                sections.append((f"{inp.path} vs baselines in {args.baselines_dir}", results))
        else:
            reference = inputs[0]
            for other in inputs[1:]:
                sections.append((f"{other.path} vs {reference.path}", compare_inputs(
                    reference, other, thresholds, allow_cross_hardware=args.allow_cross_hardware,
                    across_topologies=args.across_topologies)))
        if args.html:
            atomic_write_text(args.html, render_html(sections))
    except PdperfError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    regressed = False
    for title, results in sections:
        print(f"== {title}: {_status_counts(results)}")
        print(format_table(results))
        print()
        regressed |= any(r.regressed for r in results)
    if args.html:
        print(f"HTML: {args.html}")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
