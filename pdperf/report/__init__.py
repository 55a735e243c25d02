"""The run report: ``build_report(run_dir)`` writes ``summary.html`` and ``results.csv``.

Kept importable without the serving stack (numpy and the standard library only), so a
report can be rebuilt on a laptop from a run folder copied off the cluster:
``python -m pdperf.report reports/<run-id>``. The folder layout it reads is the contract
in :mod:`pdperf.report.rundata`; docs/REPORTS.md shows what each section means.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdperf.errors import PdperfError
from pdperf.gate.mde import REPORT_GATES, Mde, result_mdes
from pdperf.gate.thresholds import BASELINE_ROOT, Thresholds, load_thresholds
from pdperf.report.export import write_results_csv
from pdperf.report.html import render_document, render_fragment
from pdperf.report.planner import PlannerSection, planner_comparisons
from pdperf.report.rundata import ReportError, RunData, load_run
from pdperf.results import atomic_write_text

__all__ = ["build_report", "summary_fragment", "load_run", "ReportError", "RunData"]


def build_report(run_dir: Path, *, baselines_dir: Path | None = None, thresholds: Thresholds | None = None) -> Path:
    """Write ``run_dir/summary.html`` and ``run_dir/results.csv``; returns the HTML path.

    ``baselines_dir`` (the store the run was gated against) and ``thresholds`` (default: its
    ``thresholds.yaml``): the baseline-gate section then says what each gated point's gate can
    detect (pdperf.gate.mde); without them it does not.

    PD points are set against the planner's predictions from the profile of their hardware and
    model, ``<baselines_dir>/profiles/<hardware_id>/<model>.json`` (without ``baselines_dir``:
    the committed store, ``baselines/profiles``), or the report says that there is none and how
    to make one.

    Raises ReportError only when ``run_dir`` is not a folder; unreadable or missing parts
    are listed in the report's "Needs attention" box instead.
    """
    run = load_run(Path(run_dir))
    csv_path = write_results_csv(run.points, run.run_dir / "results.csv", run_id=run.run_id)
    html_path = run.run_dir / "summary.html"
    gate_mdes = _gate_mdes(run, Path(baselines_dir), thresholds) if baselines_dir is not None else None
    planner = _planner(run, Path(baselines_dir) if baselines_dir is not None else BASELINE_ROOT)
    atomic_write_text(html_path, render_document(run, gate_mdes=gate_mdes, planner=planner))
    for path in (csv_path, html_path):
        _shareable(path)
    return html_path


#: Gate statuses whose point was judged against a baseline (the MDE applies to them).
_JUDGED = ("regressed", "improved", "unchanged", "insufficient", "unconfirmed")


def _gate_mdes(run: RunData, baselines_dir: Path, thresholds: Thresholds | None) -> dict[str, list[Mde]]:
    """Per gated point id: the MDE of TPOT p50, TTFT p50 and E2E mean at the point's request count.
    What cannot be computed is listed among the report's problems, not raised."""
    if thresholds is None:
        try:
            thresholds = load_thresholds(baselines_dir / "thresholds.yaml")
        except PdperfError as e:
            run.problems.append(f"minimum detectable regressions not computed: {e}")
            return {}
    points = {p.id: p for p in run.points}
    out: dict[str, list[Mde]] = {}
    for v in run.verdicts or []:
        gate = v.gate
        if gate is None or gate.status not in _JUDGED or gate.point not in points or gate.point in out:
            continue
        try:
            mdes = result_mdes(baselines_dir, points[gate.point], thresholds, keys=REPORT_GATES)
        except (PdperfError, ValueError) as e:
            run.problems.append(f"{gate.point}: minimum detectable regression not computed: {e}")
            continue
        if mdes is not None:
            out[gate.point] = mdes
    return out


def _planner(run: RunData, baselines_dir: Path) -> PlannerSection | None:
    """The PD points against the planner's predictions (pdperf.report.planner); None without PD points.
    A failure the planner did not foresee is listed among the report's problems, not raised."""
    try:
        return planner_comparisons(run.points, profiles_dir=baselines_dir / "profiles", run_dir=run.run_dir)
    except (PdperfError, ValueError, ArithmeticError) as e:
        run.problems.append(f"predicted vs measured (planner) not computed: {e}")
        return None


def _shareable(path: Path) -> None:
    """Reports are shared (CI artifacts, web servers): the temp file behind an atomic write is 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def summary_fragment(run_dir: Path, *, baselines_dir: Path | None = None) -> str:
    """The report without the ``<html>`` wrapper (tables and plots, CSS scoped), for pytest-html;
    PD points against the planner as in :func:`build_report` (no MDE table: it simulates)."""
    run = load_run(Path(run_dir))
    return render_fragment(run, planner=_planner(run, Path(baselines_dir) if baselines_dir is not None
                                                 else BASELINE_ROOT))
