"""Reading a run folder: the contract between the code that runs points and the report.

::

    reports/<run-id>/run.json         {"run_id", "started_at", "finished_at", "environment", "command", "git_sha"}
    reports/<run-id>/points/*.json    each a PointResult.to_dict()
    reports/<run-id>/verdicts.json    [{"test_id", "outcome", "reason", "slo": [...], "gate": {...} | null}]  (optional)

The report is built after a run that may have been interrupted, so a missing run.json or
verdicts.json, or an unreadable point file, is shown in the report as a problem instead
of aborting it; ``strict=True`` (the compare CLI) turns each into an error instead.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdperf.errors import PdperfError, SpecError
from pdperf.gate.point import VerdictRecord
from pdperf.results import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, Environment, PointResult, PointSummary
from pdperf.specs import TOPOLOGY_DIR, load_topology

_POINT_KEYS = {"topology", "workload", "point_id", "records"}


class ReportError(PdperfError):
    """A run folder or result file that cannot be read; the message names it and the fix."""


@dataclass
class RunData:
    run_dir: Path
    run: dict[str, Any]
    points: list[PointResult]
    verdicts: list[VerdictRecord] | None
    problems: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.run.get("run_id") or self.run_dir.name)

    @property
    def environment(self) -> Environment:
        env = self.run.get("environment")
        if isinstance(env, dict) and env:
            return Environment.model_validate(env)
        return self.points[0].environment if self.points else Environment()


def load_point_file(path: Path) -> PointResult:
    """One point result file; every failure is a ReportError naming the file and the fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a folder without points/; pass a run folder or a point JSON file") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file; pass a run folder or a point JSON file") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e.msg} at line {e.lineno}); pass a point result written by "
                          "pdperf") from None
    if not isinstance(data, dict) or not _POINT_KEYS <= set(data):
        missing = sorted(_POINT_KEYS - set(data)) if isinstance(data, dict) else sorted(_POINT_KEYS)
        raise ReportError(f"{path}: not a pdperf point result (missing {', '.join(missing)}); pass a run folder "
                          "or one of its points/*.json files")
    if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ReportError(f"{path}: result schema_version {data.get('schema_version')} is not one of "
                          f"{READABLE_SCHEMA_VERSIONS} (written by another pdperf version); re-run the point")
    try:
        return PointResult.from_dict(data)
    except (TypeError, ValueError, KeyError) as e:
        raise ReportError(f"{path}: does not match result schema {SCHEMA_VERSION}: {e}") from None


def _read_json(path: Path, what: str, problems: list[str], strict: bool) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{path}: {what} is not valid JSON ({e}); it was left out"
        if strict:
            raise ReportError(msg) from None
        problems.append(msg)
        return None


def load_run(run_dir: Path, *, strict: bool = False) -> RunData:
    """Everything the report needs from ``run_dir`` (points sorted by topology, workload, load)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder (expected reports/<run-id>/ with run.json and points/)")
    problems: list[str] = []
    run = _read_json(run_dir / "run.json", "run.json", problems, strict)
    if run is None and not (run_dir / "run.json").exists():
        problems.append(f"{run_dir / 'run.json'}: missing; run metadata comes from the first point's environment")
    if run is not None and not isinstance(run, dict):
        problems.append(f"{run_dir / 'run.json'}: expected a JSON object; ignored")
        run = None
    points_dir = run_dir / "points"
    files = sorted(points_dir.glob("*.json")) if points_dir.is_dir() else []
    if not files and strict:
        raise ReportError(f"{run_dir}: no points/*.json; pass a run folder written by pdperf or a point JSON file")
    points = []
    for f in files:
        try:
            points.append(load_point_file(f))
        except ReportError as e:
            if strict:
                raise
            problems.append(f"{e}; left out")
    points.sort(key=lambda p: (p.topology, p.workload, p.sweep_kind, p.point_value, p.point_id))
    raw = _read_json(run_dir / "verdicts.json", "verdicts.json", problems, strict)
    verdicts: list[VerdictRecord] | None = None
    if raw is not None and not isinstance(raw, list):
        problems.append(f"{run_dir / 'verdicts.json'}: expected a JSON list; ignored")
    elif raw is not None:
        verdicts = []
        for i, v in enumerate(raw):
            try:
                verdicts.append(VerdictRecord.from_dict(v))
            except (TypeError, ValueError, KeyError) as e:
                msg = f"{run_dir / 'verdicts.json'}: entry {i} is not a verdict ({e}); left out"
                if strict:
                    raise ReportError(msg) from None
                problems.append(msg)
    return RunData(run_dir, run or {}, points, verdicts, problems)


def point_summary(p: PointResult) -> PointSummary:
    return p.summary


def latency(summary: PointSummary, metric: str, statistic: str) -> float | None:
    """``latency(s, "ttft_ms", "p99")``; None when the point has no samples of the metric."""
    return summary.stat(metric, statistic)


def throughput(summary: PointSummary, key: str) -> float | None:
    """A per-point rate: a field of the summary's throughput (``output_tok_per_s``) or the goodput."""
    v = getattr(summary.throughput, key, None) if key in type(summary.throughput).model_fields else getattr(summary, key, None)
    return float(v) if isinstance(v, (int, float)) else None


_PD_NAME = re.compile(r"(^|-)pd(-|$)")


@functools.lru_cache(maxsize=256)
def _kind_from_spec(topology: str) -> str | None:
    """The ``kind`` of ``topologies/<topology>.yaml`` when that file exists and validates."""
    path = TOPOLOGY_DIR / f"{topology}.yaml"
    if not path.is_file():
        return None
    try:
        return load_topology(path).kind
    except SpecError:
        return None  # an invalid spec is reported by the spec tests; the name still tells the kind


def topology_kind(p: PointResult) -> str:
    """'pd' or 'collocated': a ``topology_kind`` key in the point, else the topology's spec file,
    else the name (a ``pd`` dash-separated word, as in ``pd-1p1d`` or ``cpu-pd-1p1-1d1``)."""
    kind = p.environment.topology_kind
    if kind in ("pd", "collocated"):
        return kind
    return _kind_from_spec(p.topology) or ("pd" if _PD_NAME.search(p.topology) else "collocated")
