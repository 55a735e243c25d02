"""The regression gate and the verdict on a point.

- :mod:`pdperf.gate.thresholds`: the limits, as data (``baselines/thresholds.yaml``);
- :mod:`pdperf.gate.store`: the baseline store (schema 2, pydantic; schema 1 migrated on load);
- :mod:`pdperf.gate.verdicts`: the gate's rule on one point against its baseline;
- :mod:`pdperf.gate.point`: the verdict on a measured point: failures, SLOs, the gate,
  confirmation of regressions, when a sweep stops.
"""

from pdperf.gate.point import PointVerdict, SweepTracker, confirm_regression, judge, slo_failures
from pdperf.gate.store import (
                               BandRun,
                               Baseline,
                               BaselineEntry,
                               BaselineFile,
                               band_mismatch,
                               baseline_path,
                               flag_advice,
                               load_baseline,
                               load_baseline_file,
                               remove_band_run,
                               write_baseline,
)
from pdperf.gate.thresholds import (
                               BaselineError,
                               Gate,
                               ResolvedThresholds,
                               Thresholds,
                               load_thresholds,
                               sample_shortfalls,
)
from pdperf.gate.verdicts import Confirmation, GateResult, MetricVerdict, compare_point, gate_point, judge_metric

__all__ = ["Baseline", "BaselineEntry", "BaselineError", "BaselineFile", "BandRun", "Confirmation", "Gate", "GateResult",
           "MetricVerdict", "PointVerdict", "ResolvedThresholds", "SweepTracker", "Thresholds", "band_mismatch",
           "baseline_path", "compare_point", "confirm_regression", "flag_advice", "gate_point", "judge",
           "judge_metric", "load_baseline", "load_baseline_file", "load_thresholds", "remove_band_run",
           "sample_shortfalls", "slo_failures", "write_baseline"]
