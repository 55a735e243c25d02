"""The run report: ``build_report(run_dir)`` writes ``summary.html`` and ``results.csv``.

Kept importable without the serving stack (numpy and the standard library only), so a
report can be rebuilt on a laptop from a run folder copied off the cluster:
``python -m pdperf.report reports/<run-id>``. The folder layout it reads is the contract
in :mod:`pdperf.report.rundata`; docs/REPORTS.md shows what each section means.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdperf.report.export import write_results_csv
from pdperf.report.html import render_document, render_fragment
from pdperf.report.rundata import ReportError, RunData, load_run
from pdperf.results import atomic_write_text

__all__ = ["build_report", "summary_fragment", "load_run", "ReportError", "RunData"]


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/summary.html`` and ``run_dir/results.csv``; returns the HTML path.

    Raises ReportError only when ``run_dir`` is not a folder; unreadable or missing parts
    are listed in the report's "Needs attention" box instead.
    """
    run = load_run(Path(run_dir))
    csv_path = write_results_csv(run.points, run.run_dir / "results.csv", run_id=run.run_id)
    html_path = run.run_dir / "summary.html"
    atomic_write_text(html_path, render_document(run))
    for path in (csv_path, html_path):
        _shareable(path)
    return html_path


def _shareable(path: Path) -> None:
    """Reports are shared (CI artifacts, web servers): the temp file behind an atomic write is 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def summary_fragment(run_dir: Path) -> str:
    """The report without the ``<html>`` wrapper (tables and plots, CSS scoped), for pytest-html."""
    return render_fragment(load_run(Path(run_dir)))
