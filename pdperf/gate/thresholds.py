"""Gate thresholds: which statistic of which metric may get how much worse, as data.

The limits live in ``baselines/thresholds.yaml`` (per-metric, direction-aware, with
per-hardware overrides) and are loaded by a strict pydantic model, so a typo is an error
naming the file and the key instead of a silently different gate. docs/METHODOLOGY.md
("Regression gate") explains the rule the limits feed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdperf import metrics
from pdperf.errors import PdperfError
from pdperf.stats import parse_statistic

if TYPE_CHECKING:
    from pdperf.specs import Workload

ROOT = Path(__file__).resolve().parent.parent.parent
BASELINE_ROOT = ROOT / "baselines"
THRESHOLDS_PATH = BASELINE_ROOT / "thresholds.yaml"
#: Metrics whose per-request samples are stored and can be gated.
SAMPLED_METRICS = metrics.LATENCY_METRICS
Direction = metrics.Direction


class BaselineError(PdperfError):
    """A baseline or thresholds file that is missing what it needs, or cannot be read."""


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
    def _direction_matches_metric(self) -> Gate:
        natural = metrics.METRICS[self.metric].direction
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
    def _unique(self) -> Thresholds:
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


def sample_shortfalls(workload: Workload, thresholds: Thresholds | ResolvedThresholds, *,
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
    parts: list[str] = []
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
