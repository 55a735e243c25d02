"""Sweep tier: each (topology, workload, point) is one test, id `topology/workload/c16` or `.../r4`.

Concurrency (closed loop) and rate (open loop) points share one test function so that the
cases run topology by topology: a topology is deployed once for all of its workloads.
A point passes when its SLOs hold and the baseline gate finds no significant regression
larger than its threshold; a regression is measured again (--confirm-regressions, default once)
and fails only if it repeats. Points after two consecutive SLO misses are skipped (the sweep
has found its limit). `--update-baselines` records instead of gating.
"""

from __future__ import annotations

import pytest

from fixtures.session import get_endpoint

pytestmark = pytest.mark.sweep


def test_point(sweep_case, deployment_pool, measure, judge, sweep_guard):
    sweep_guard(sweep_case.topology.name, sweep_case.workload)
    endpoint = get_endpoint(deployment_pool, sweep_case.topology)

    def run(attempt: int = 0):
        return measure(endpoint, sweep_case.workload, sweep_case.point, requests=sweep_case.requests, attempt=attempt)

    judge(run(), remeasure=run)
