"""Baseline store: what a point measured on this hardware, kept to gate the next run against.

Baselines live at ``baselines/<hardware_id>/<topology>/<workload>.json`` (another backend's
beside it as ``<workload>.<backend>.json``), one file per topology and workload, one entry per
load point. An entry keeps raw per-request samples (not only percentiles) so the gate can
test significance, each request's statistics of its gaps (per-token metrics are judged per
request), and its *band*: the statistics of every recorded run of the point. On 4x H100 with
eager engines a fresh deployment of unchanged code decoded c4 at 18.9 or 24.4 ms per token
(x1.29) while each run's own requests agreed closely: the spread between deployments is not
in one run's samples, so it is recorded as runs (``--add-baseline-runs``, ``pdperf baseline
add-run``) and a change's size is measured from the band's worst (best) run.

Schema 2 (:class:`BaselineFile`) is a pydantic model; schema 1 files, in the shapes the code
wrote over time (without ``runs``, without ``request_stats``), load through one migration
(:func:`migrate_v1`) and are written back as schema 2. A file can be *retired*: kept
readable as history and never gated (the H100 baselines recorded with eager engines).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdperf import metrics
from pdperf.gate.thresholds import SAMPLED_METRICS, BaselineError
from pdperf.results import Environment, PointResult, PointSummary, atomic_write_json
from pdperf.stats import DEFAULT_SAMPLE_CAP, even_subsample, statistic_value

BASELINE_SCHEMA_VERSION = 2
#: Statistics kept per recorded run of a point (its band); a gate on another statistic has no band.
RUN_STATISTICS = ("mean", "p50", "p90", "p95", "p99")
#: Runs a band keeps: the first (whose samples are stored) and the latest others.
MAX_BAND_RUNS = 8
#: Environment keys that make a run another configuration, not another run of the same one: a
#: band refuses a run that differs from its baseline in one of them (absent = none, except the
#: keys recorded only later, where absent = unknown: UNKNOWN_WHEN_ABSENT).
BAND_CONFIG_KEYS = ("engine_overrides", "co_resident", "topology_kind", "model", "engine_mode", "request_options")
UNKNOWN_WHEN_ABSENT = ("model", "engine_mode", "request_options")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")
_LOCK_TIMEOUT_S = 60.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BandRun(_Strict):
    """One recorded run of a point: the statistics of all its requests, per metric."""

    started_at: str | None = None
    git_sha: str | None = None
    startup_s: float | None = None
    deploy_adopted: bool | None = None
    statistics: dict[str, dict[str, float]] = Field(default_factory=dict)

    def stat(self, metric: str, statistic: str) -> float | None:
        return (self.statistics.get(metric) or {}).get(statistic)


class BaselineEntry(_Strict):
    """One load point's baseline: the first run's samples (significance) and the band of runs (size)."""

    runs: list[BandRun]
    summary: PointSummary
    samples: dict[str, list[float]]
    request_stats: dict[str, dict[str, list[float]]] = Field(default_factory=dict)
    started_at: str
    sweep_kind: str
    point_value: float
    gpus: int
    flags: list[str] = Field(default_factory=list)
    environment: Environment

    def band(self, metric: str, statistic: str) -> list[float] | None:
        """The statistic in each recorded run, when there are two or more runs that all hold it."""
        values = [r.stat(metric, statistic) for r in self.runs]
        if len(values) < 2 or any(v is None for v in values):
            return None
        return [float(v) for v in values if v is not None]


class BaselineFile(_Strict):
    """One baseline file: the points of one topology under one workload on one hardware."""

    schema_version: Literal[2] = 2
    hardware_id: str
    environment: Environment
    updated_at: str = ""
    status: Literal["active", "retired"] = "active"
    retired_reason: str | None = None
    points: dict[str, BaselineEntry] = Field(default_factory=dict)

    def entry(self, point_id: str) -> BaselineEntry | None:
        return self.points.get(point_id)


class Baseline:
    """A loaded baseline file and where it came from."""

    def __init__(self, path: Path, data: BaselineFile) -> None:
        self.path = Path(path)
        self.data = data

    @property
    def hardware_id(self) -> str:
        return self.data.hardware_id

    @property
    def points(self) -> dict[str, BaselineEntry]:
        return self.data.points

    @property
    def retired(self) -> str | None:
        """Why the file is retired (never gated), or None when it is active."""
        return (self.data.retired_reason or "retired") if self.data.status == "retired" else None

    def entry(self, point_id: str) -> BaselineEntry | None:
        return self.data.entry(point_id)

    def environment_of(self, point_id: str) -> Environment:
        """The environment the point was recorded in (falls back to the file's)."""
        e = self.data.entry(point_id)
        return e.environment if e is not None else self.data.environment


# --------------------------------------------------------------------------- migration


def run_statistics(samples: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{metric: {statistic: value}}`` of RUN_STATISTICS for each metric with samples."""
    out = {}
    for m, values in samples.items():
        v = np.asarray(values, dtype=float)
        if len(v):
            out[m] = {st: float(statistic_value(v, st)) for st in RUN_STATISTICS}
    return out


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 file as schema 2: an entry recorded before bands is one run (its samples'
    statistics); one recorded before per-request statistics keeps none (the gate then judges
    pooled gaps and says so)."""
    points = {}
    for pid, e in (data.get("points") or {}).items():
        e = dict(e)
        if not e.get("runs"):
            e["runs"] = [{"started_at": e.get("started_at"), "git_sha": (e.get("environment") or {}).get("git_sha"),
                          "statistics": run_statistics(e.get("samples") or {})}]
        e.setdefault("request_stats", {})
        points[pid] = e
    return {"schema_version": 2, "hardware_id": data.get("hardware_id"), "environment": data.get("environment") or {},
            "updated_at": str(data.get("updated_at", "")), "status": "active", "points": points}


def parse_baseline(data: Any, path: Path) -> BaselineFile:
    """Validate a baseline file's JSON (schema 2, or 1 through :func:`migrate_v1`); errors name the file."""
    if not isinstance(data, dict) or "points" not in data:
        raise BaselineError(f"{path}: not a baseline file (no 'points' key)")
    version = data.get("schema_version")
    if version == 1:
        data = migrate_v1(data)
    elif version != BASELINE_SCHEMA_VERSION:
        raise BaselineError(f"{path}: baseline schema_version {version} is not 1 or {BASELINE_SCHEMA_VERSION}; "
                            "re-record it with --update-baselines")
    if not isinstance(data.get("hardware_id"), str):
        raise BaselineError(f"{path}: no 'hardware_id'; re-record it with --update-baselines")
    try:
        return BaselineFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise BaselineError(f"{path}: not a valid baseline ({loc}: {first['msg']}; {e.error_count()} problem(s)); "
                            "restore it from git or re-record it with --update-baselines") from None


def load_baseline_file(path: Path) -> Baseline:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline file") from None
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path}: not valid JSON ({e}); restore it from git or re-record with "
                            "--update-baselines") from None
    return Baseline(path, parse_baseline(data, path))


def write_baseline_file(path: Path, data: BaselineFile) -> None:
    atomic_write_json(path, data.model_dump(mode="json", by_alias=True, exclude_none=False))


# --------------------------------------------------------------------------- paths


def _slug(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not _SLUG.match(value):
        raise BaselineError(f"{kind} {value!r} is not a slug (lower-case letters, digits, '.', '_', '-'); "
                            "it names a folder under baselines/")
    return value


def baseline_path(root: Path, hardware_id: str, topology: str, workload: str, backend: str | None = None) -> Path:
    """``root/<hardware_id>/<topology>/<workload>.json`` for the Ray backend (the suite's subject), and
    ``<workload>.<backend>.json`` for another backend, so that recording the no-Ray reference never
    overwrites the Ray baseline of the same point (each part checked to be a slug)."""
    suffix = "" if backend in (None, "", "ray") else f".{_slug('backend', backend)}"
    return (Path(root) / _slug("hardware_id", hardware_id) / _slug("topology", topology)
            / f"{_slug('workload', workload)}{suffix}.json")


def load_baseline(root: Path, hardware_id: str, topology: str, workload: str,
                  backend: str | None = None) -> Baseline | None:
    """The baseline file of this hardware, topology, workload and backend; None if there is none yet."""
    path = baseline_path(root, hardware_id, topology, workload, backend)
    if not path.exists():
        return None
    baseline = load_baseline_file(path)
    if baseline.hardware_id != hardware_id:
        raise BaselineError(f"{path}: holds hardware_id '{baseline.hardware_id}' but sits under '{hardware_id}'; "
                            "move it to the folder of its hardware")
    return baseline


def committed_baseline_files(root: Path) -> list[Path]:
    """Every baseline file under ``root`` (``<hardware_id>/<topology>/*.json``; planner profiles excluded)."""
    return sorted(p for p in Path(root).glob("*/*/*.json") if p.parts[-3] != "profiles")


def _lock_for(path: Path) -> FileLock:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"pdperf-baseline-{digest}.lock"), timeout=_LOCK_TIMEOUT_S)


# --------------------------------------------------------------------------- entries from points


def point_samples(result: PointResult, cap: int = DEFAULT_SAMPLE_CAP) -> dict[str, list[float]]:
    """Per-metric samples of one point (successful, non-warm-up requests), at most ``cap`` each."""
    return {m: [float(v) for v in even_subsample(metrics.samples(result.records, m), cap)] for m in SAMPLED_METRICS}


def point_request_stats(result: PointResult) -> dict[str, dict[str, list[float]]]:
    """Per-token metrics: each request's p50 / p90 / p99 of its gaps (the gate's per-request judgement)."""
    return {m: {st: [float(v) for v in metrics.per_request_values(result.records, m, st)]
                for st in metrics.REQUEST_STATISTICS} for m in metrics.PER_GAP_METRICS}


def run_entry(result: PointResult) -> BandRun:
    """One recorded run of a point, as its baseline's band keeps it (statistics of all its requests)."""
    env = result.environment
    extra = env.model_extra or {}
    return BandRun(started_at=result.started_at, git_sha=env.git_sha, startup_s=env.startup_s,
                   deploy_adopted=extra.get("deploy_adopted"),
                   statistics=run_statistics({m: metrics.samples(result.records, m) for m in SAMPLED_METRICS}))


def new_entry(result: PointResult, cap: int = DEFAULT_SAMPLE_CAP) -> BaselineEntry:
    return BaselineEntry(runs=[run_entry(result)], summary=result.summary, samples=point_samples(result, cap),
                         request_stats=point_request_stats(result), started_at=result.started_at,
                         sweep_kind=result.sweep_kind, point_value=result.point_value, gpus=result.gpus,
                         flags=list(result.flags), environment=result.environment)


def band_mismatch(entry: BaselineEntry, result: PointResult) -> str | None:
    """Why ``result`` is another configuration than the baseline entry's (BAND_CONFIG_KEYS), or None."""
    old_env, new_env = entry.environment.model_dump(), result.environment.model_dump()
    for key in BAND_CONFIG_KEYS:
        a, b = old_env.get(key) or "", new_env.get(key) or ""
        if key in UNKNOWN_WHEN_ABSENT and not (a and b):
            continue
        if a != b:
            return f"{key} '{b or '(none)'}' differs from the baseline's '{a or '(none)'}'"
    return None


INJECTED_FLAG = "injected_slowdown"  # pdperf.inject: a regression of known size, put there on purpose

# What each point flag means for a recording, and what to do (flags: pdperf/loadgen/runner.py, fixtures/reporting.py).
FLAG_ADVICE = {
    "client_loop_lag": "The load generator's event loop lagged, so its timestamps are late: another job was "
                       "using this machine's CPUs; re-run the point when it is quiet.",
    "client_cpu_saturated": "The load generator used a whole core, so it, not the server, set the pace: "
                            "re-run on a quieter machine or with fewer concurrent streams per client process.",
    "replica_restart_during_load": "A replica restarted while the point ran: see the start-up table and "
                                   "`pdperf diagnose`, fix the cause, re-run.",
    "output_length_mismatch": "Responses did not have the requested output length (ignore_eos or max_tokens not "
                              "honoured): check the engine arguments.",
    "input_length_mismatch": "Prompts did not have the requested input length (tokenizer differs from the "
                             "server's?): check --tokenizer / the model.",
    "telemetry_counter_reset": "A server metrics counter went backwards (an engine restarted): re-run.",
    "telemetry_scrape_failed": "The server's /metrics could not be read: check metrics_urls and re-run.",
    INJECTED_FLAG: "The point was slowed on purpose (--inject-slowdown, pdperf.inject): it measures what the gate "
                   "detects and is never a baseline.",
    "requests_failed": "Requests failed during the point (the verdict names how many and why): a baseline must "
                       "come from a point where every request succeeded; fix the cause and re-run.",
}


def flag_advice(flags: Iterable[str]) -> str:
    """One sentence per distinct flag (``replica_restart_during_load:2`` counts as its name)."""
    seen = dict.fromkeys(f.split(":", 1)[0] for f in flags)
    return " ".join(FLAG_ADVICE.get(f, f"Flag {f}: re-run the point.") for f in seen)


# --------------------------------------------------------------------------- writing


def write_baseline(root: Path, point_results: Iterable[PointResult], *, allow_flagged: bool = False,
                   cap: int = DEFAULT_SAMPLE_CAP, add_run: bool = False) -> list[Path]:
    """Store ``point_results`` as baselines, merged into existing files; returns the files written.

    ``add_run``: a point that already has an entry keeps it (its samples, the gate's reference
    for significance) and gets this result appended to its band of runs (the first run and the
    latest MAX_BAND_RUNS - 1 others are kept; a run already in the band, same ``started_at``, is
    not added twice); a point without an entry gets a new one, as without ``add_run``.

    Every point is checked before anything is written: a point without a hardware id, without
    successful requests, or with flags such as ``replica_restart_during_load`` (unless
    ``allow_flagged``) raises BaselineError, since a baseline recorded during trouble would hide
    the next regression. Writing into a retired file replaces it (a new, active baseline).
    """
    groups: dict[Path, list[PointResult]] = {}
    existing_files: dict[Path, Baseline] = {}  # read once while checking, for add_run
    for r in point_results:
        hw = r.environment.hardware_id
        if not hw:
            raise BaselineError(f"point {r.id}: environment has no 'hardware_id', so it has no baseline folder; "
                                "record the environment fingerprint with the point")
        injected = [f for f in r.flags if f.startswith(INJECTED_FLAG)]
        if injected:  # a deliberately slowed point is never anyone's reference, flagged or not
            raise BaselineError(f"point {r.id}: {injected[0]} (--inject-slowdown): a regression put there on "
                                "purpose is never written as a baseline; run without --inject-slowdown")
        if r.flags and not allow_flagged:
            raise BaselineError(f"point {r.id}: flagged {', '.join(r.flags)}; a baseline recorded like this would "
                                f"hide regressions, so none was written. {flag_advice(r.flags)}")
        if not any(rec.ok and not rec.warmup for rec in r.records):
            raise BaselineError(f"point {r.id}: no successful measured request; nothing to keep as a baseline")
        path = baseline_path(root, hw, r.topology, r.workload, r.environment.backend)
        if add_run and path.exists():
            if path not in existing_files:
                existing_files[path] = load_baseline_file(path)
            prior = existing_files[path].entry(r.point_id) if not existing_files[path].retired else None
            why = band_mismatch(prior, r) if prior else None
            if why:
                raise BaselineError(f"point {r.id}: {why}; a band holds runs of one configuration, so this run "
                                    "was not added: gate it against the baseline instead, or keep that "
                                    "configuration's baselines apart (--baselines-dir)")
        groups.setdefault(path, []).append(r)

    written = []
    for path, results in groups.items():
        with _lock_for(path):
            existing = load_baseline_file(path) if path.exists() else None
            points = dict(existing.points) if existing and not existing.retired else {}
            for r in results:
                prior = points.get(r.point_id)
                if add_run and prior is not None:
                    runs = list(prior.runs)
                    if all(run.started_at != r.started_at for run in runs):
                        runs.append(run_entry(r))
                    if len(runs) > MAX_BAND_RUNS:
                        runs = runs[:1] + runs[-(MAX_BAND_RUNS - 1):]
                    points[r.point_id] = prior.model_copy(update={"runs": runs})
                    continue
                points[r.point_id] = new_entry(r, cap)
            latest = results[-1]
            write_baseline_file(path, BaselineFile(
                hardware_id=latest.environment.hardware_id or "", environment=latest.environment,
                updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                points=dict(sorted(points.items()))))
        written.append(path)
    return written


def remove_band_run(path: Path, point_id: str, number: int) -> BandRun:
    """Drop run ``number`` (1-based, as ``pdperf baseline show --runs`` lists them) from a point's
    band and return it. The first run holds the samples the gate tests against and stays; to
    replace it, record the point again with --update-baselines."""
    path = Path(path)
    with _lock_for(path):
        baseline = load_baseline_file(path)
        entry = baseline.entry(point_id)
        if entry is None:
            raise BaselineError(f"{path}: no point '{point_id}'; it has {', '.join(sorted(baseline.points)) or 'none'}")
        runs = list(entry.runs)
        if number == 1:
            raise BaselineError(f"{path} {point_id}: run 1 holds the samples the gate tests against and is not "
                                "removed; record the point again with --update-baselines to replace it")
        if not 2 <= number <= len(runs):
            raise BaselineError(f"{path} {point_id}: no run {number}; its band has run"
                                f"{'s 1-' + str(len(runs)) if len(runs) > 1 else ' 1 only'}")
        removed = runs.pop(number - 1)
        data = baseline.data.model_copy(update={
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "points": {**baseline.points, point_id: entry.model_copy(update={"runs": runs})}})
        write_baseline_file(path, data)
    return removed


def retire(path: Path, reason: str) -> None:
    """Mark a baseline file retired: kept readable as history, never gated."""
    path = Path(path)
    with _lock_for(path):
        baseline = load_baseline_file(path)
        write_baseline_file(path, baseline.data.model_copy(update={"status": "retired", "retired_reason": reason}))
