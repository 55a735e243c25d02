"""The PD planner: which deployment of a GPU budget serves a workload best, before spending it.

Profiles of prefill and decode engines (:mod:`~pdperf.planner.profiles`), fitted to measured
sweeps (:mod:`~pdperf.planner.fit`), drive an analytic queueing model of the closed and open
loop (:mod:`~pdperf.planner.model`) that a discrete-event simulator checks
(:mod:`~pdperf.planner.simulate`); :mod:`~pdperf.planner.search` ranks layouts under an SLO
and :mod:`~pdperf.planner.cli` is the command. docs/PLANNER.md explains the model, its
assumptions and its measured error.

For a report: ``predict_for_result(profile, point_result) -> PointComparison``.
"""

from pdperf.planner.model import Deployment, Prediction, WorkloadPoint
from pdperf.planner.predict import (
                                    Interval,
                                    PointComparison,
                                    PredictionWithInterval,
                                    predict,
                                    predict_for_result,
                                    predict_interval,
)
from pdperf.planner.profiles import PlannerError, Profile, load_profile

__all__ = ["Deployment", "Interval", "PlannerError", "PointComparison", "Prediction", "PredictionWithInterval",
           "Profile", "WorkloadPoint", "load_profile", "predict", "predict_for_result", "predict_interval"]
