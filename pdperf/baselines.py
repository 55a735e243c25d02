"""Baseline store and regression gate: "is this point slower than it was on this hardware?"

Baselines live at ``baselines/<hardware_id>/<topology>/<workload>.json``, one file per
topology and workload, one entry per load point, and keep raw per-request samples (not
only percentiles) so the gate can test significance. A baseline recorded on other
hardware is never used: ``compare_point`` refuses and names both fingerprints, because
an H100 number says nothing about a CPU run (the reference study compared configs with
different GPU counts; we refuse to).

The gate's rule (docs/METHODOLOGY.md, "Regression gate"): a metric regresses only when
the change is both statistically significant (Mann-Whitney p < alpha and the bootstrap
ratio interval excludes 1) and larger than a per-metric, direction-aware limit. Per-token
metrics (ITL, chunk gaps) are judged for significance per request — one value per request,
that request's statistic of its gaps — since the gaps of one request move together and
pooled as independent samples they made a 17% move between two runs of unchanged code
look certain (4x H100, PD c1: p = 8e-193). The
limits are data in ``baselines/thresholds.yaml``, with per-hardware overrides, loaded
here by a strict pydantic model so a typo is an error naming the file and the key.

A point's baseline can hold several recorded runs, its *band* (``runs``: each run's statistics;
``--add-baseline-runs``, ``pdperf baseline add-run``): on 4x H100 a fresh deployment of unchanged
code decoded c4 at 18.9 or 24.4 ms per token (TPOT p50; x1.29), beyond the +15% limit, while each
run's own requests agreed closely (benchmarks/results/gpu-runs/SESSION-LOG.md, seventh session). The spread between
deployments is not in one run's samples, so no within-run test can know it. With two or more
runs, a change's size is measured from the band's worst run (a regression) or best run (an
improvement) instead of from the first run; its significance still from the first run's samples.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np
import yaml
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdperf import metrics
from pdperf.errors import PdperfError
from pdperf.results import PointResult, atomic_write_json
from pdperf.stats import (DEFAULT_SAMPLE_CAP, bootstrap_ratio_ci, even_subsample, format_p_value, format_value,
                          mann_whitney_u, parse_statistic, statistic_value)

if TYPE_CHECKING:
    from pdperf.specs import Workload

BASELINE_SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parent.parent
BASELINE_ROOT = ROOT / "baselines"
THRESHOLDS_PATH = BASELINE_ROOT / "thresholds.yaml"
#: Metrics whose per-request samples are stored and can be gated.
SAMPLED_METRICS = metrics.LATENCY_METRICS
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

Direction = Literal["lower-is-better", "higher-is-better"]
Verdict = Literal["regressed", "improved", "unchanged", "insufficient"]
#: Overall statuses: the verdicts, plus "incomparable" (other hardware), "missing" (no baseline)
#: and "unconfirmed" (regressed, then not in a re-measurement: pdperf.checks.confirm_regression).
STATUSES = ("regressed", "improved", "unchanged", "insufficient", "incomparable", "missing", "unconfirmed")


class BaselineError(PdperfError):
    """A baseline or thresholds file that is missing what it needs, or cannot be read."""


# --------------------------------------------------------------------------- thresholds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_metric(metric: str) -> str:
    if metric not in SAMPLED_METRICS:
        raise ValueError(f"metric '{metric}' has no per-request samples to gate; "
                         f"use one of {', '.join(SAMPLED_METRICS)}")
    return metric


def _check_statistic(statistic: str) -> str:
    parse_statistic(statistic)  # raises ValueError with the accepted forms
    return statistic


class _MetricStatistic(_Strict):
    """A metric with per-request samples and a statistic of them (shared by gates and overrides)."""

    metric: str
    statistic: str

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, v: str) -> str:
        return _check_metric(v)

    @field_validator("statistic")
    @classmethod
    def _statistic_known(cls, v: str) -> str:
        return _check_statistic(v)


class Gate(_MetricStatistic):
    """One gated number: ``statistic`` of ``metric`` may not get worse by more than ``max_change``."""

    metric: str
    statistic: str
    max_change: float = Field(gt=0, description="relative limit: 0.25 lets lower-is-better grow to x1.25")
    direction: Direction
    min_samples: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _direction_matches_metric(self) -> "Gate":
        natural = "higher-is-better" if self.metric in metrics.HIGHER_IS_BETTER else "lower-is-better"
        if self.direction != natural:
            raise ValueError(f"{self.metric} is {natural} (pdperf.metrics); direction '{self.direction}' "
                             f"would report improvements as regressions")
        return self

    @property
    def key(self) -> str:
        return f"{self.statistic} {self.metric}"


class GateOverride(_MetricStatistic):
    """A per-hardware change to the default gate with the same metric and statistic."""

    metric: str
    statistic: str
    max_change: float | None = Field(None, gt=0)
    direction: Direction | None = None
    min_samples: int | None = Field(None, ge=2)
    enabled: bool = True


class HardwareOverride(_Strict):
    match: str = Field(description="shell glob on environment.hardware_id, e.g. 'cpu-*'")
    alpha: float | None = Field(None, gt=0, lt=1)
    ci_level: float | None = Field(None, gt=0, lt=1)
    min_samples: int | None = Field(None, ge=2)
    gates: list[GateOverride] = Field(default_factory=list)


@dataclass(frozen=True)
class ResolvedThresholds:
    """The thresholds that apply to one hardware_id, overrides applied."""

    alpha: float
    ci_level: float
    bootstrap_resamples: int
    gates: tuple[Gate, ...]
    source: str  # "default" or "hardware 'cpu-*'"


class Thresholds(_Strict):
    """The content of ``baselines/thresholds.yaml``."""

    schema_version: Literal[1]
    alpha: float = Field(gt=0, lt=1)
    ci_level: float = Field(gt=0, lt=1)
    bootstrap_resamples: int = Field(1000, ge=100)
    min_samples: int = Field(30, ge=2)
    gates: list[Gate] = Field(min_length=1)
    hardware: list[HardwareOverride] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "Thresholds":
        keys = [g.key for g in self.gates]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"gates: {', '.join(dup)} listed more than once; keep one entry each")
        for i, hw in enumerate(self.hardware):
            for g in hw.gates:
                if g.direction is None and f"{g.statistic} {g.metric}" not in keys and g.enabled:
                    raise ValueError(f"hardware.{i} ({hw.match}): gate {g.statistic} {g.metric} is not in the default "
                                     "gates, so it needs max_change and direction of its own")
        return self

    def resolve(self, hardware_id: str | None) -> ResolvedThresholds:
        """Default gates, with the first hardware override whose ``match`` fits ``hardware_id`` applied."""
        hw = next((h for h in self.hardware if hardware_id and fnmatch.fnmatchcase(hardware_id, h.match)), None)
        gates = {g.key: g for g in self.gates}
        alpha, level, min_samples = self.alpha, self.ci_level, self.min_samples
        if hw is not None:
            alpha = hw.alpha or alpha
            level = hw.ci_level or level
            min_samples = hw.min_samples or min_samples
            for o in hw.gates:
                key = f"{o.statistic} {o.metric}"
                if not o.enabled:
                    gates.pop(key, None)
                    continue
                base = gates.get(key)
                fields = {k: v for k, v in o.model_dump().items() if v is not None and k != "enabled"}
                if base is not None:
                    gates[key] = base.model_copy(update=fields)
                else:
                    if fields.get("max_change") is None:
                        raise BaselineError(f"thresholds: hardware '{hw.match}' adds gate {key} without "
                                            "max_change; add it")
                    gates[key] = Gate(**fields)
        filled = tuple(g if g.min_samples else g.model_copy(update={"min_samples": min_samples})
                       for g in gates.values())
        return ResolvedThresholds(alpha, level, self.bootstrap_resamples, filled,
                                  f"hardware '{hw.match}'" if hw else "default")


def load_thresholds(path: Path = THRESHOLDS_PATH) -> Thresholds:
    """Read and validate a thresholds file; errors name the file, the key and the fix."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such thresholds file; pass the path of baselines/thresholds.yaml") from None
    except yaml.YAMLError as e:
        raise BaselineError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BaselineError(f"{path}: expected a mapping at the top level")
    try:
        return Thresholds.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key; the keys are described at the top of baselines/thresholds.yaml"
            lines.append(f"  {loc}: {msg}")
        raise BaselineError(f"{path}: invalid thresholds\n" + "\n".join(lines)) from None


def _gate_names(gates: list[Gate]) -> str:
    """'p50 ttft_ms/tpot_ms and mean e2e_ms': the gates grouped by statistic, in file order."""
    by_stat: dict[str, list[str]] = {}
    for g in gates:
        by_stat.setdefault(g.statistic, []).append(g.metric)
    names = [f"{stat} {'/'.join(ms)}" for stat, ms in by_stat.items()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _counts_text(ids_counts: list[tuple[str, int]]) -> str:
    """'c1 has 16, c4 32' or 'c1, c2 have 60': consecutive points with the same count share it."""
    groups: list[tuple[list[str], int]] = []
    for pid, n in ids_counts:
        if groups and groups[-1][1] == n:
            groups[-1][0].append(pid)
        else:
            groups.append(([pid], n))
    parts = [f"{', '.join(ids)} {'has' if len(ids) == 1 else 'have'} {n}" if i == 0 else f"{', '.join(ids)} {n}"
             for i, (ids, n) in enumerate(groups)]
    return ", ".join(parts)


def sample_shortfalls(workload: "Workload", thresholds: "Thresholds | ResolvedThresholds", *,
                      hardware_id: str | None = None, requests_scale: float = 1.0,
                      points: Iterable[float] | None = None) -> list[str]:
    """Which sweep points of ``workload`` send too few requests for which per-request gates.

    TTFT, TPOT and E2E give one sample per request (``metrics.PER_REQUEST_METRICS``), so a
    point of n requests has at most n of them, and a gate whose ``min_samples`` exceeds n
    reads ``insufficient`` there whatever the run does; the point's status is then decided
    by its other gates (ITL and chunk gaps: one sample per gap). Said at collection, so
    that nobody spends GPU hours on a TTFT gate that cannot fire. Returns one line per
    workload, none when every point has enough; ``points`` limits it to the selected ones.
    """
    resolved = thresholds.resolve(hardware_id) if isinstance(thresholds, Thresholds) else thresholds
    sweep = workload.sweep
    wanted = None if points is None else set(points)
    counts = [(p, sweep.scaled_requests_at(p, requests_scale)) for p in sweep.points if wanted is None or p in wanted]
    by_need: dict[int, list[Gate]] = {}
    for g in resolved.gates:
        if g.metric in metrics.PER_REQUEST_METRICS:
            by_need.setdefault(g.min_samples or 2, []).append(g)
    parts = []
    for need in sorted(by_need, reverse=True):
        short = [(sweep.point_id(p), n) for p, n in counts if n < need]
        if short:
            unit = " requests a point" if not parts else ""
            parts.append(f"{_gate_names(by_need[need])} need {need}{unit} ({_counts_text(short)})")
    if not parts:
        return []
    knob = "requests_per_point" if sweep.requests_per_point is not None else "requests_per_concurrency / min_requests"
    fix = f"raise {knob} to gate them"
    if requests_scale < 1:
        fix += f", or drop --requests-scale {requests_scale:g}"
    return [f"{workload.name}: {'; '.join(parts)}: they read 'insufficient' there ({fix})"]


# --------------------------------------------------------------------------- store


def _slug(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not _SLUG.match(value):
        raise BaselineError(f"{kind} {value!r} is not a slug (lower-case letters, digits, '.', '_', '-'); "
                            "it names a folder under baselines/")
    return value


def hardware_id_of(env: dict[str, Any]) -> str | None:
    hw = env.get("hardware_id") if isinstance(env, dict) else None
    return hw if isinstance(hw, str) and hw else None


def baseline_path(root: Path, hardware_id: str, topology: str, workload: str, backend: str | None = None) -> Path:
    """``root/<hardware_id>/<topology>/<workload>.json`` for the Ray backend (the suite's subject), and
    ``<workload>.<backend>.json`` for another backend, so that recording the no-Ray reference never
    overwrites the Ray baseline of the same point (each part checked to be a slug)."""
    suffix = "" if backend in (None, "", "ray") else f".{_slug('backend', backend)}"
    return (Path(root) / _slug("hardware_id", hardware_id) / _slug("topology", topology)
            / f"{_slug('workload', workload)}{suffix}.json")


def point_samples(result: PointResult, cap: int = DEFAULT_SAMPLE_CAP) -> dict[str, list[float]]:
    """Per-metric samples of one point (successful, non-warm-up requests), at most ``cap`` each."""
    return {m: [float(v) for v in even_subsample(metrics.samples(result.records, m), cap)] for m in SAMPLED_METRICS}


def point_request_stats(result: PointResult) -> dict[str, dict[str, list[float]]]:
    """Per-token metrics: each request's p50 / p90 / p99 of its gaps (the gate's per-request judgement)."""
    return {m: {st: [float(v) for v in metrics.per_request_values(result.records, m, st)]
                for st in metrics.REQUEST_STATISTICS} for m in metrics.PER_GAP_METRICS}


def _summary_of(result: PointResult) -> dict[str, Any]:
    if result.summary:
        return result.summary
    return metrics.summarize(result.records, duration_s=result.duration_s, gpus=result.gpus)


def _run_statistics(samples: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{metric: {statistic: value}}`` of RUN_STATISTICS for each metric with samples."""
    out = {}
    for m, values in samples.items():
        v = np.asarray(values, dtype=float)
        if len(v):
            out[m] = {st: float(statistic_value(v, st)) for st in RUN_STATISTICS}
    return out


def run_entry(result: PointResult) -> dict[str, Any]:
    """One recorded run of a point, as its baseline's band keeps it (statistics of all its requests)."""
    env = result.environment or {}
    return {"started_at": result.started_at, "git_sha": env.get("git_sha"), "startup_s": env.get("startup_s"),
            "deploy_adopted": env.get("deploy_adopted"),
            "statistics": _run_statistics({m: metrics.samples(result.records, m) for m in SAMPLED_METRICS})}


def band_runs(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a baseline entry; an entry recorded before bands existed is one run (its samples)."""
    runs = entry.get("runs")
    if runs:
        return list(runs)
    return [{"started_at": entry.get("started_at"), "git_sha": (entry.get("environment") or {}).get("git_sha"),
             "statistics": _run_statistics(entry.get("samples") or {})}]


def band_mismatch(entry: dict[str, Any], result: PointResult) -> str | None:
    """Why ``result`` is another configuration than the baseline entry's (BAND_CONFIG_KEYS), or None."""
    old_env, new_env = entry.get("environment") or {}, result.environment or {}
    for key in BAND_CONFIG_KEYS:
        a, b = old_env.get(key) or "", new_env.get(key) or ""
        if key in UNKNOWN_WHEN_ABSENT and not (a and b):
            continue
        if a != b:
            return f"{key} '{b or '(none)'}' differs from the baseline's '{a or '(none)'}'"
    return None


def run_statistic(run: dict[str, Any], metric: str, statistic: str) -> float | None:
    """One statistic of one run of a band (None where the run does not keep it)."""
    return ((run.get("statistics") or {}).get(metric) or {}).get(statistic)


def band_values(entry: dict[str, Any], metric: str, statistic: str) -> list[float] | None:
    """The statistic of each of the entry's runs, when it has two or more runs that all hold it
    (an entry from before bands is one run: no band, and nothing to compute)."""
    values = [run_statistic(r, metric, statistic) for r in entry.get("runs") or []]
    if len(values) < 2 or any(v is None for v in values):
        return None
    return [float(v) for v in values]


def remove_band_run(path: Path, point_id: str, number: int) -> dict[str, Any]:
    """Drop run ``number`` (1-based, as ``pdperf baseline show --runs`` lists them) from a point's
    band and return it. The first run holds the samples the gate tests against and stays; to
    replace it, record the point again with --update-baselines."""
    path = Path(path)
    with _lock_for(path):
        baseline = load_baseline_file(path)
        entry = baseline.entry(point_id)
        if entry is None:
            raise BaselineError(f"{path}: no point '{point_id}'; it has {', '.join(sorted(baseline.points)) or 'none'}")
        runs = band_runs(entry)
        if number == 1:
            raise BaselineError(f"{path} {point_id}: run 1 holds the samples the gate tests against and is not "
                                "removed; record the point again with --update-baselines to replace it")
        if not 2 <= number <= len(runs):
            raise BaselineError(f"{path} {point_id}: no run {number}; its band has run"
                                f"{'s 1-' + str(len(runs)) if len(runs) > 1 else ' 1 only'}")
        removed = runs.pop(number - 1)
        atomic_write_json(path, {
            "schema_version": BASELINE_SCHEMA_VERSION, "hardware_id": baseline.hardware_id,
            "environment": baseline.environment,
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "points": {**baseline.points, point_id: {**entry, "runs": runs}},
        })
    return removed


@dataclass
class Baseline:
    """One baseline file: the points of one topology under one workload on one hardware."""

    path: Path
    hardware_id: str
    environment: dict[str, Any]
    updated_at: str
    points: dict[str, dict[str, Any]]

    def entry(self, point_id: str) -> dict[str, Any] | None:
        return self.points.get(point_id)

    def environment_of(self, point_id: str) -> dict[str, Any]:
        """The environment the point was recorded in (falls back to the file's)."""
        e = self.points.get(point_id, {})
        return e.get("environment") or self.environment


def load_baseline_file(path: Path) -> Baseline:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline file") from None
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path}: not valid JSON ({e}); restore it from git or re-record with "
                            "--update-baselines") from None
    if not isinstance(data, dict) or "points" not in data:
        raise BaselineError(f"{path}: not a baseline file (no 'points' key)")
    version = data.get("schema_version")
    if version != BASELINE_SCHEMA_VERSION:
        raise BaselineError(f"{path}: baseline schema_version {version} is not {BASELINE_SCHEMA_VERSION}; "
                            "re-record it with --update-baselines")
    hw = data.get("hardware_id")
    if not isinstance(hw, str):
        raise BaselineError(f"{path}: no 'hardware_id'; re-record it with --update-baselines")
    return Baseline(path, hw, data.get("environment") or {}, str(data.get("updated_at", "")), dict(data["points"]))


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


def _lock_for(path: Path) -> FileLock:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"pdperf-baseline-{digest}.lock"), timeout=_LOCK_TIMEOUT_S)


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
    "requests_failed": "Requests failed during the point (the verdict names how many and why): a baseline must "
                       "come from a point where every request succeeded; fix the cause and re-run.",
}


def flag_advice(flags: Iterable[str]) -> str:
    """One sentence per distinct flag (``replica_restart_during_load:2`` counts as its name)."""
    seen = dict.fromkeys(f.split(":", 1)[0] for f in flags)
    return " ".join(FLAG_ADVICE.get(f, f"Flag {f}: re-run the point.") for f in seen)


def write_baseline(root: Path, point_results: Iterable[PointResult], *, allow_flagged: bool = False,
                   cap: int = DEFAULT_SAMPLE_CAP, add_run: bool = False) -> list[Path]:
    """Store ``point_results`` as baselines, merged into existing files; returns the files written.

    ``add_run``: a point that already has an entry keeps it (its samples, the gate's reference
    for significance) and gets this result appended to its band of runs (the first run and the
    latest MAX_BAND_RUNS - 1 others are kept; a run already in the band, same ``started_at``, is
    not added twice); a point without an entry gets a new one, as without ``add_run``.

    Every point is checked before anything is written: a point without
    ``environment["hardware_id"]``, without successful requests, or with flags such as
    ``replica_restart_during_load`` (unless ``allow_flagged``) raises BaselineError, since
    a baseline recorded during trouble would hide the next regression.
    """
    groups: dict[Path, list[PointResult]] = {}
    existing_files: dict[Path, Baseline] = {}  # read once while checking, for add_run
    for r in point_results:
        hw = hardware_id_of(r.environment)
        if hw is None:
            raise BaselineError(f"point {r.id}: environment has no 'hardware_id', so it has no baseline folder; "
                                "record the environment fingerprint with the point")
        if r.flags and not allow_flagged:
            raise BaselineError(f"point {r.id}: flagged {', '.join(r.flags)}; a baseline recorded like this would "
                                f"hide regressions, so none was written. {flag_advice(r.flags)}")
        if not any(rec.ok and not rec.warmup for rec in r.records):
            raise BaselineError(f"point {r.id}: no successful measured request; nothing to keep as a baseline")
        path = baseline_path(root, hw, r.topology, r.workload, r.environment.get("backend"))
        if add_run and path.exists():
            if path not in existing_files:
                existing_files[path] = load_baseline_file(path)
            prior = existing_files[path].entry(r.point_id)
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
            points = dict(existing.points) if existing else {}
            for r in results:
                prior = points.get(r.point_id)
                if add_run and prior is not None:
                    runs = band_runs(prior)
                    if all(run.get("started_at") != r.started_at for run in runs):
                        runs.append(run_entry(r))
                    if len(runs) > MAX_BAND_RUNS:
                        runs = runs[:1] + runs[-(MAX_BAND_RUNS - 1):]
                    points[r.point_id] = {**prior, "runs": runs}
                    continue
                points[r.point_id] = {
                    "runs": [run_entry(r)],
                    "summary": _summary_of(r),
                    "samples": point_samples(r, cap),
                    "request_stats": point_request_stats(r),
                    "started_at": r.started_at,
                    "sweep_kind": r.sweep_kind,
                    "point_value": r.point_value,
                    "gpus": r.gpus,
                    "flags": list(r.flags),
                    "environment": r.environment,
                }
            latest = results[-1]
            atomic_write_json(path, {
                "schema_version": BASELINE_SCHEMA_VERSION,
                "hardware_id": hardware_id_of(latest.environment),
                "environment": latest.environment,
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "points": dict(sorted(points.items())),
            })
        written.append(path)
    return written


# --------------------------------------------------------------------------- gate


def _limit_text(gate_direction: str, max_change: float, bad: bool) -> str:
    """'+50%' for the bad side of lower-is-better, '-33%' for its mirror, and so on."""
    up = (gate_direction == "lower-is-better") == bad
    return f"+{max_change * 100:.0f}%" if up else f"-{(1 - 1 / (1 + max_change)) * 100:.0f}%"


@dataclass
class MetricVerdict:
    """The gate's finding on one statistic of one metric."""

    metric: str
    statistic: str
    direction: str
    verdict: str
    reason: str
    baseline_value: float | None = None
    current_value: float | None = None
    ratio: float | None = None
    ratio_ci: tuple[float, float] | None = None
    p_value: float | None = None
    threshold: float | None = None  # max_change
    n_baseline: int = 0
    n_current: int = 0
    unit: str = ""
    # per-token metrics judged per request: how many requests each side had (None: pooled gaps)
    requests_current: int | None = None
    requests_baseline: int | None = None
    # ... and the ratio of the median request's value, the one the interval is about (the
    # pooled ratio above can lie outside it: at c64 a few requests' tails move the pooled p99)
    request_ratio: float | None = None
    # the baseline's band (two or more recorded runs): the statistic's range over them and how
    # many; the verdict's size was then measured from the band's worst (or best) run
    band_low: float | None = None
    band_high: float | None = None
    band_runs: int | None = None

    @property
    def key(self) -> str:
        return f"{self.statistic} {self.metric}"

    def message(self) -> str:
        """``p99 tpot_ms 14.1 -> 29.8 ms (x2.11, CI 1.9-2.3, p=1e-12) exceeds +50%: regressed``."""
        head = f"{self.statistic} {self.metric}"
        if self.ratio is None:
            return f"{head}: {self.reason}: {self.verdict}"
        unit = f" {self.unit}" if self.unit else ""
        ci = f", CI {self.ratio_ci[0]:.3g}-{self.ratio_ci[1]:.3g}" if self.ratio_ci else ", CI n/a"
        if self.request_ratio is not None:
            ci = f"; median request x{self.request_ratio:.2f}{ci}"
        p = format_p_value(self.p_value)
        per = (f", over {self.requests_current}/{self.requests_baseline} requests"
               if self.requests_current is not None else "")
        if self.band_runs:
            per += f"; {self.band_runs} baseline runs {format_value(self.band_low)}-{format_value(self.band_high)}"
        return (f"{head} {format_value(self.baseline_value)} -> {format_value(self.current_value)}{unit} "
                f"(x{self.ratio:.2f}{ci}, p{'' if p.startswith('<') else '='}{p}{per}) {self.reason}: {self.verdict}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_ci"] = list(self.ratio_ci) if self.ratio_ci else None
        d["message"] = self.message()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetricVerdict":
        d = {k: v for k, v in d.items() if k != "message"}
        if d.get("ratio_ci") is not None:
            d["ratio_ci"] = tuple(d["ratio_ci"])
        return cls(**d)


@dataclass
class GateResult:
    """The baseline gate's finding on one point: an overall status and a verdict per gated metric."""

    point: str
    status: str
    verdicts: list[MetricVerdict] = field(default_factory=list)
    reason: str = ""
    hardware_id: str | None = None
    baseline_hardware_id: str | None = None
    thresholds_source: str = ""
    notes: list[str] = field(default_factory=list)
    # Re-measurements of a regressed point (pdperf.checks.confirm_regression): per attempt
    # {"attempt", "status", "message", "point_file"}; empty when none was made.
    confirmations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.status == "regressed"

    def message(self) -> str:
        """One line for a human: the regressed (or improved) metrics, or why nothing was compared."""
        if self.status == "unconfirmed":  # the first measurement's verdicts say "regressed"
            parts = "; ".join(v.message() for v in self.verdicts if v.verdict == "regressed")
            last = self.confirmations[-1] if self.confirmations else {}
            return (f"{self.point}: unconfirmed: the first measurement regressed ({parts}), "
                    f"re-measurement {last.get('attempt', '?')} did not ({last.get('status', '?')}): the point's "
                    "own run-to-run spread, not a regression shown twice")
        if self.status in ("regressed", "improved"):
            text = f"{self.point}: " + "; ".join(v.message() for v in self.verdicts if v.verdict == self.status)
            if self.confirmations:
                n = len(self.confirmations)
                text += f" (confirmed by {n} re-measurement{'s' if n != 1 else ''})"
            return text
        if self.status == "unchanged":
            n = sum(1 for v in self.verdicts if v.verdict == "unchanged")
            return f"{self.point}: unchanged ({n} of {len(self.verdicts)} gated metrics within limits)"
        return f"{self.point}: {self.status}: {self.reason}"

    __str__ = message

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "status": self.status, "message": self.message(), "reason": self.reason,
                "hardware_id": self.hardware_id, "baseline_hardware_id": self.baseline_hardware_id,
                "thresholds_source": self.thresholds_source, "notes": list(self.notes),
                "verdicts": [v.to_dict() for v in self.verdicts], "confirmations": list(self.confirmations)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateResult":
        return cls(point=d["point"], status=d["status"], reason=d.get("reason", ""),
                   hardware_id=d.get("hardware_id"), baseline_hardware_id=d.get("baseline_hardware_id"),
                   thresholds_source=d.get("thresholds_source", ""), notes=list(d.get("notes", [])),
                   verdicts=[MetricVerdict.from_dict(v) for v in d.get("verdicts", [])],
                   confirmations=list(d.get("confirmations", [])))


def _env_differences(current: dict[str, Any], baseline: dict[str, Any], limit: int = 8) -> list[str]:
    """``key old -> new`` per differing scalar key; a key absent on one side (as ``co_resident``
    of a point measured alone) or empty reads ``(none)``, and absent equals empty."""
    diffs = []
    for key in sorted(set(current) | set(baseline)):
        a, b = baseline.get(key), current.get(key)
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or a == b:
            continue
        if a in (None, "") and b in (None, ""):
            continue
        diffs.append(f"{key} {_shown(a)} -> {_shown(b)}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... {len(diffs) - limit} more"]
    return diffs


def _shown(value: Any) -> Any:
    return "(none)" if value in (None, "") else value


def judge_metric(gate: Gate, current: np.ndarray, baseline: np.ndarray, *, alpha: float, ci_level: float,
                 resamples: int, seed: int = 0, current_requests: np.ndarray | None = None,
                 baseline_requests: np.ndarray | None = None, band: list[float] | None = None) -> MetricVerdict:
    """Apply one gate to two sample sets (the rule is in the module docstring).

    ``current_requests`` / ``baseline_requests`` (per-token metrics): one value per request, the
    gate's statistic of that request's gaps. Given both, the size of the change is still the ratio
    of the pooled statistic, but its significance comes from them: Mann-Whitney over requests, and
    the interval of the ratio of the median request's value, resampling requests (that ratio is
    kept as ``request_ratio`` and printed beside the interval it belongs to).

    ``band``: the statistic in each of the baseline's recorded runs (two or more). The limit is
    then applied to the current value against the band's worst run (regressed) and best run
    (improved): a move within the spread already seen between deployments of the same code is
    not a change. ``ratio`` stays the one against ``baseline`` (the first run).
    """
    unit = metrics.UNITS.get(gate.metric, "")
    common = dict(metric=gate.metric, statistic=gate.statistic, direction=gate.direction, threshold=gate.max_change,
                  n_baseline=int(len(baseline)), n_current=int(len(current)), unit=unit)
    need = gate.min_samples or 2
    if len(current) < need or len(baseline) < need:
        return MetricVerdict(verdict="insufficient", reason=f"{len(current)} current / {len(baseline)} baseline "
                             f"samples, needs {need} on each side", **common)
    base_value = statistic_value(baseline, gate.statistic)
    cur_value = statistic_value(current, gate.statistic)
    if base_value <= 0:
        return MetricVerdict(verdict="insufficient", baseline_value=base_value, current_value=cur_value,
                             reason=f"baseline {gate.statistic} is {base_value:g}, so a relative change is undefined",
                             **common)
    ratio = cur_value / base_value
    per_request = current_requests is not None and baseline_requests is not None
    if per_request:
        cur_req, base_req = np.asarray(current_requests, dtype=float), np.asarray(baseline_requests, dtype=float)
        p = mann_whitney_u(cur_req, base_req).p_value if len(cur_req) and len(base_req) else 1.0
        ci = bootstrap_ratio_ci(cur_req, base_req, "p50", resamples=resamples, level=ci_level, seed=seed)
        base_median = float(np.median(base_req)) if len(base_req) else 0.0
        common.update(requests_current=int(len(cur_req)), requests_baseline=int(len(base_req)),
                      request_ratio=(float(np.median(cur_req)) / base_median) if base_median > 0 and len(cur_req)
                      else None)
    else:
        p = mann_whitney_u(current, baseline).p_value
        ci = bootstrap_ratio_ci(current, baseline, gate.statistic, resamples=resamples, level=ci_level, seed=seed)
    up_sig = p < alpha and ci is not None and ci[0] > 1
    down_sig = p < alpha and ci is not None and ci[1] < 1
    hi, lo = 1 + gate.max_change, 1 / (1 + gate.max_change)
    lower_better = gate.direction == "lower-is-better"
    worst = best = base_value
    banded = bool(band) and len(band) >= 2 and min(band) > 0
    if banded:
        worst, best = (max(band), min(band)) if lower_better else (min(band), max(band))
        common.update(band_low=float(min(band)), band_high=float(max(band)), band_runs=len(band))
    bad_ratio, good_ratio = cur_value / worst, cur_value / best
    bad_large = bad_ratio > hi if lower_better else bad_ratio < lo
    good_large = good_ratio < lo if lower_better else good_ratio > hi
    bad_sig = up_sig if lower_better else down_sig
    good_sig = down_sig if lower_better else up_sig
    of_band = f" of the worst run (x{bad_ratio:.2f})" if banded else ""
    of_best = f" of the best run (x{good_ratio:.2f})" if banded else ""
    bad_limit = _limit_text(gate.direction, gate.max_change, bad=True) + of_band
    good_limit = _limit_text(gate.direction, gate.max_change, bad=False) + of_best
    if bad_large and bad_sig:
        verdict, reason = "regressed", f"exceeds {bad_limit}"
    elif good_large and good_sig:
        verdict, reason = "improved", f"beyond {good_limit}"
    elif bad_large or good_large:
        verdict = "unchanged"
        reason = (f"beyond {bad_limit if bad_large else good_limit} but not significant "
                  f"(needs p < {alpha:g} and a CI that excludes 1)")
    else:
        verdict = "unchanged"
        reason = f"within {bad_limit}" + (" (significant but small)" if (up_sig or down_sig) else "")
    return MetricVerdict(verdict=verdict, reason=reason, baseline_value=base_value, current_value=cur_value,
                         ratio=ratio, ratio_ci=ci, p_value=p, **common)


def _overall(verdicts: list[MetricVerdict]) -> str:
    kinds = {v.verdict for v in verdicts}
    if "regressed" in kinds:
        return "regressed"
    if "improved" in kinds:
        return "improved"
    if not verdicts or kinds == {"insufficient"}:
        return "insufficient"
    return "unchanged"


def compare_samples(point: str, current: dict[str, np.ndarray], baseline: dict[str, Any],
                    thresholds: ResolvedThresholds, *, current_requests: dict[str, dict[str, Any]] | None = None,
                    baseline_requests: dict[str, dict[str, Any]] | None = None,
                    bands: dict[str, list[float]] | None = None) -> list[MetricVerdict]:
    """Verdicts of every gate in ``thresholds`` on per-metric sample sets.

    ``*_requests``: ``{metric: {statistic: per-request values}}`` for per-token metrics (see
    judge_metric); a gate whose statistic either side lacks judges the pooled gaps.
    ``bands``: per gate key (``"p50 tpot_ms"``) the statistic in each recorded baseline run.
    """
    out = []
    for gate in thresholds.gates:
        if gate.metric not in baseline:
            out.append(MetricVerdict(gate.metric, gate.statistic, gate.direction, "insufficient",
                                     f"the baseline of {point} has no {gate.metric} samples; re-record it with "
                                     "--update-baselines", threshold=gate.max_change))
            continue
        cur = even_subsample(np.asarray(current.get(gate.metric, []), dtype=float))
        base = np.asarray(baseline[gate.metric], dtype=float)
        out.append(judge_metric(gate, cur, base, alpha=thresholds.alpha, ci_level=thresholds.ci_level,
                                resamples=thresholds.bootstrap_resamples,
                                current_requests=((current_requests or {}).get(gate.metric) or {}).get(gate.statistic),
                                baseline_requests=((baseline_requests or {}).get(gate.metric) or {}).get(gate.statistic),
                                band=(bands or {}).get(gate.key)))
    return out


def compare_point(current: PointResult, baseline_entry: dict[str, Any] | None, baseline_env: dict[str, Any],
                  thresholds: Thresholds | ResolvedThresholds, *, allow_cross_hardware: bool = False) -> GateResult:
    """Gate one point against its baseline entry (a ``points[point_id]`` value of a baseline file).

    Status "incomparable" when the hardware_id or the backend differs (unless
    ``allow_cross_hardware``, for ad-hoc comparisons), "missing" when there is no entry; otherwise the worst verdict.
    """
    hw = hardware_id_of(current.environment)
    base_hw = hardware_id_of(baseline_env)
    resolved = thresholds.resolve(hw) if isinstance(thresholds, Thresholds) else thresholds
    result = GateResult(point=current.id, status="unchanged", hardware_id=hw, baseline_hardware_id=base_hw,
                        thresholds_source=resolved.source)
    if baseline_entry is None:
        result.status = "missing"
        result.reason = (f"no baseline for {current.id} on hardware '{hw}'; record one with --update-baselines "
                         "(or --record-missing-baselines: only points that have none)")
        return result
    backend, base_backend = current.environment.get("backend"), baseline_env.get("backend")
    mismatches = [  # (differs, why, what to do instead)
        (hw is None or base_hw is None or hw != base_hw,
         f"hardware differs: current '{hw or 'unknown'}', baseline '{base_hw or 'unknown'}'; baselines compare "
         "only within one hardware_id", "record a baseline on this hardware with --update-baselines"),
        (bool(backend and base_backend and backend != base_backend),
         f"backend differs: current '{backend}', baseline '{base_backend}'; a baseline gates only the backend "
         "that recorded it", "compare the two runs with `pdperf compare` instead"),
    ]
    for differs, reason, instead in mismatches:
        if not differs:
            continue
        if not allow_cross_hardware:
            result.status = "incomparable"
            result.reason = f"{reason} ({instead})"
            return result
        result.notes.append(reason)
    result.notes.extend(f"environment differs: {d}" for d in _env_differences(current.environment, baseline_env))
    if current.flags:
        result.notes.append(f"current point flagged: {', '.join(current.flags)}")
    if baseline_entry.get("flags"):
        result.notes.append(f"baseline point was flagged: {', '.join(baseline_entry['flags'])}")
    gated = {g.metric for g in resolved.gates}
    samples = {m: metrics.samples(current.records, m) for m in gated}
    per_gap = [g for g in resolved.gates if g.metric in metrics.PER_GAP_METRICS]
    current_requests: dict[str, dict[str, np.ndarray]] = {}
    for g in per_gap:
        current_requests.setdefault(g.metric, {})[g.statistic] = metrics.per_request_values(current.records, g.metric,
                                                                                             g.statistic)
    baseline_requests = baseline_entry.get("request_stats") or {}
    pooled = sorted({g.key for g in per_gap if g.statistic not in (baseline_requests.get(g.metric) or {})})
    if pooled:
        result.notes.append(f"the baseline keeps no per-request values for {', '.join(pooled)} (recorded before "
                            "they were kept): judged on pooled gaps, whose p-values are optimistic; "
                            "re-record it with --update-baselines")
    bands = {g.key: b for g in resolved.gates if (b := band_values(baseline_entry, g.metric, g.statistic))}
    runs = len(baseline_entry.get("runs") or [])
    if runs > 1:
        unbanded = sorted(g.key for g in resolved.gates if g.key not in bands)
        result.notes.append(f"baseline band of {runs} runs: limits apply from its worst (best) run"
                            + (f"; not for {', '.join(unbanded)} (a statistic the runs do not keep)" if unbanded
                               else ""))
    result.verdicts = compare_samples(current.id, samples, baseline_entry.get("samples", {}), resolved,
                                      current_requests=current_requests, baseline_requests=baseline_requests,
                                      bands=bands)
    result.status = _overall(result.verdicts)
    if result.status == "insufficient":
        result.reason = "; ".join(v.message() for v in result.verdicts[:2])
    return result


def gate_point(root: Path, current: PointResult, thresholds: Thresholds) -> GateResult:
    """Load the baseline of ``current``'s hardware, topology and workload and gate the point against it."""
    hw = hardware_id_of(current.environment)
    if hw is None:
        return GateResult(point=current.id, status="incomparable",
                          reason="the point's environment has no 'hardware_id', so no baseline can match it")
    baseline = load_baseline(root, hw, current.topology, current.workload, current.environment.get("backend"))
    if baseline is None:
        return compare_point(current, None, {"hardware_id": hw}, thresholds)
    return compare_point(current, baseline.entry(current.point_id), baseline.environment_of(current.point_id),
                         thresholds)
