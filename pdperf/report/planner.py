"""Predicted against measured: the planner's prediction for each PD point of a run.

Why in the report: a profile (docs/PLANNER.md) is only worth its ranking if it predicts what
the suite then measures. Every run with PD points says how far its profile was off on them,
so a profile that has drifted (new vLLM, compiled instead of eager engines, another cluster)
shows up the next time PD is measured.

The stage between the run folder and the HTML: :func:`planner_comparisons` finds the profile
of each PD point's hardware and model in ``<baselines>/profiles/<hardware_id>/<model>.json``
(where ``pdperf planner calibrate --store <baselines>/profiles`` writes it) and runs
:func:`pdperf.planner.predict_for_result` on the point; :mod:`pdperf.report.html` renders the
:class:`PlannerSection`. Nothing here raises for a missing or unreadable profile or a point
the model cannot take: each becomes the group's or the row's ``problem`` text.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdperf.errors import PdperfError
from pdperf.planner import PointComparison, Profile, load_profile, predict_for_result
from pdperf.planner.fit import REPORT_METRICS
from pdperf.planner.profiles import profile_path
from pdperf.report.rundata import topology_kind
from pdperf.results import PointResult
from pdperf.specs import TOPOLOGY_DIR, Topology, load_topology

#: How a user makes a profile for this hardware and model (the planner's CLI; docs/PLANNER.md).
CALIBRATE_COMMAND = "pdperf planner calibrate --runs {runs} --store {store}"


@dataclass(frozen=True)
class PredictedPoint:
    """One PD point: its prediction beside the measurement, or why there is none."""

    point_id: str  # PointResult.id
    comparison: PointComparison | None
    problem: str | None = None
    in_calibration: bool = False  # the point's configuration (topology name or 1P-TP2:1D-TP2 label) was fitted


@dataclass(frozen=True)
class ProfileGroup:
    """The PD points of one (hardware, model), and the profile found for them (or why not)."""

    hardware_id: str  # "" when the points do not record it
    model: str
    path: Path | None  # where the profile is (or would be); None when the hardware or model is unknown
    profile: Profile | None
    problem: str | None
    points: tuple[PredictedPoint, ...]
    calibratable: bool = True  # ``pdperf planner calibrate`` can make a profile for these points (GPU ones)

    def median_abs_error_pct(self, metric: str) -> float | None:
        errs = [abs(e) for p in self.points if p.comparison is not None
                for e in (p.comparison.error_pct(metric),) if e is not None and math.isfinite(e)]
        return statistics.median(errs) if errs else None


@dataclass(frozen=True)
class PlannerSection:
    """What the report's "Predicted vs measured" section shows."""

    profiles_dir: Path
    run_dir: Path
    groups: tuple[ProfileGroup, ...]
    level: float

    def calibrate_command(self, group: ProfileGroup) -> str:
        """The command that makes ``group``'s profile from this run (naming what the points do not record)."""
        cmd = CALIBRATE_COMMAND.format(runs=self.run_dir, store=self.profiles_dir)
        if not group.hardware_id:
            cmd += " --hardware-id <hardware_id>"
        if not group.model:
            cmd += " --model <model>"
        return cmd


def _topology(name: str, topology_dir: Path) -> Topology | str:
    """The point's topology spec, or why it cannot be read."""
    try:
        return load_topology(topology_dir / f"{name}.yaml")
    except PdperfError as e:
        return f"its topology spec cannot be read ({e})"


def planner_comparisons(points: Sequence[PointResult], *, profiles_dir: Path, run_dir: Path,
                        topology_dir: Path | None = None, level: float = 0.9) -> PlannerSection | None:
    """Predicted against measured for every PD point of ``points``; None when there is no PD point."""
    tdir = Path(topology_dir) if topology_dir else TOPOLOGY_DIR
    pd_points = [p for p in points if topology_kind(p) == "pd"]
    if not pd_points:
        return None
    by_key: dict[tuple[str, str], list[PointResult]] = {}
    for p in pd_points:
        key = (p.environment.hardware_id or "", p.environment.model or "")
        by_key.setdefault(key, []).append(p)
    groups = []
    for (hardware, model), pts in sorted(by_key.items()):
        path = profile_path(profiles_dir, hardware, model) if hardware and model else None
        profile: Profile | None = None
        problem: str | None = None
        topologies = {p.topology: _topology(p.topology, tdir) for p in pts}
        cpu_only = all(isinstance(t, Topology) and t.device == "cpu" for t in topologies.values())
        if cpu_only:
            problem = "CPU points: the planner models GPU engines only, so no profile is made for them"
        elif not hardware or not model:
            problem = (f"the points do not record their {'hardware_id' if not hardware else 'model'}; "
                       "profiles are per hardware and model")
        elif path is None or not path.is_file():
            problem = "no profile for this hardware and model"
        else:
            try:
                profile = load_profile(path, hardware_id=hardware, model=model)
            except PdperfError as e:
                problem = f"profile not usable: {e}"
        rows = []
        for p in pts:
            topo = topologies[p.topology]
            if profile is None:
                continue
            if isinstance(topo, str):
                rows.append(PredictedPoint(p.id, None, topo))
                continue
            cal = profile.calibration
            try:
                cmp = predict_for_result(profile, p, topo, level=level)
            except (PdperfError, ValueError, ZeroDivisionError, OverflowError) as e:
                rows.append(PredictedPoint(p.id, None, f"no prediction: {e}"))
                continue
            in_cal = cal is not None and bool({cmp.measured.config, cmp.measured.deployment.label} & set(cal.configs))
            rows.append(PredictedPoint(p.id, cmp, None, in_cal))
        groups.append(ProfileGroup(hardware_id=hardware, model=model, path=path, profile=profile, problem=problem,
                                   points=tuple(rows), calibratable=not cpu_only))
    return PlannerSection(profiles_dir=Path(profiles_dir), run_dir=Path(run_dir), groups=tuple(groups), level=level)


__all__ = ["CALIBRATE_COMMAND", "PlannerSection", "PredictedPoint", "ProfileGroup", "REPORT_METRICS",
           "planner_comparisons"]
