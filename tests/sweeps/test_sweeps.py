"""Sweep tier: each (topology, workload, point) is one test, id `topology/workload/c16` or `.../r4`.

A point passes when its SLOs hold and the baseline gate finds no significant regression
larger than its threshold. Points after two consecutive SLO misses are skipped (the sweep
has found its limit). `--update-baselines` records instead of gating.
"""

from __future__ import annotations

import pytest

from fixtures.session import get_endpoint

pytestmark = pytest.mark.sweep


def _run(case, deployment_pool, measure, judge, sweep_guard):
    sweep_guard(case.topology.name, case.workload)
    endpoint = get_endpoint(deployment_pool, case.topology)
    result = measure(endpoint, case.workload, case.point, requests=case.requests)
    judge(result)


@pytest.mark.sweep_kind("concurrency")
def test_concurrency(sweep_case, deployment_pool, measure, judge, sweep_guard):
    _run(sweep_case, deployment_pool, measure, judge, sweep_guard)


@pytest.mark.sweep_kind("rate")
def test_rate(sweep_case, deployment_pool, measure, judge, sweep_guard):
    _run(sweep_case, deployment_pool, measure, judge, sweep_guard)
