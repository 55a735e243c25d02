"""Machine-readable exports of a run: ``results.csv``, one row per point and metric.

For spreadsheets and dashboards that should not parse JSON: a long table (point x
metric) so new metrics add rows, not columns. Latency rows fill the distribution columns
(n, mean, percentiles, p99 interval); throughput and count rows fill ``value``. JUnit XML
comes from pytest itself (``--junitxml``), so nothing is written for it here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pdperf import metrics
from pdperf.report.rundata import point_summary
from pdperf.results import PointResult, atomic_write_text

DIST_COLUMNS = ("n", "mean", "p50", "p90", "p95", "p99", "p99.9")
COLUMNS = ("run_id", "id", "topology", "workload", "point_id", "sweep_kind", "point_value", "gpus", "metric",
           "unit", *DIST_COLUMNS, "p99_ci_low", "p99_ci_high", "value")
#: Scalar rows: summary key -> unit.
SCALARS = {"req_per_s": "req/s", "input_tok_per_s": "tok/s", "output_tok_per_s": "tok/s",
           "output_tok_per_s_per_gpu": "tok/s/GPU", "goodput_req_per_s": "req/s", "slo_attainment": "fraction",
           "requests": "count", "requests_ok": "count", "requests_failed": "count"}


def _cell(v: Any) -> Any:
    return "" if v is None else v


def csv_rows(points: Iterable[PointResult], run_id: str = "") -> list[dict[str, Any]]:
    rows = []
    for p in points:
        s = point_summary(p)
        head = {"run_id": run_id, "id": p.id, "topology": p.topology, "workload": p.workload,
                "point_id": p.point_id, "sweep_kind": p.sweep_kind, "point_value": p.point_value, "gpus": p.gpus}
        for m in metrics.LATENCY_METRICS:
            d = s.metrics.get(m)
            if d is None:
                continue
            ci = d.p99_ci or (None, None)
            rows.append({**head, "metric": m, "unit": metrics.UNITS.get(m, ""),
                         **{c: _cell(d.n if c == "n" else d.stat(c)) for c in DIST_COLUMNS},
                         "p99_ci_low": _cell(ci[0]), "p99_ci_high": _cell(ci[1]), "value": ""})
        for key, unit in SCALARS.items():
            v = getattr(s.throughput, key) if key in type(s.throughput).model_fields else getattr(s, key)
            if v is None:
                continue
            rows.append({**head, "metric": key, "unit": unit, **{c: "" for c in DIST_COLUMNS},
                         "p99_ci_low": "", "p99_ci_high": "", "value": float(v)})
    return rows


def write_results_csv(points: Iterable[PointResult], path: Path, run_id: str = "") -> Path:
    """Write ``results.csv`` atomically; returns its path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(points, run_id))
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)
