"""The search on a constructed case whose optimum is known by hand, the layouts it enumerates,
its bootstrap probabilities and the topology files it writes.

The constructed profile (TP 1 only, 4 GPUs on one node, 6 req/s of ISL 5000 / OSL 100, SLO
p99 TTFT <= 2000 ms and p99 TPOT <= 20 ms): a prompt costs 100 ms on a PD prefill engine and
250 ms on a collocated one; a decode step costs 10 ms + 1 ms per running sequence. Worked out:

- one decode engine at 6 req/s: TPOT = 11 / (1 - 0.001 * 6 * 100) = 27.5 ms > 20: every xP:1D fails;
- two decode engines (3 req/s each): TPOT = 11 / (1 - 0.3) = 15.7 ms: 1P:2D meets the SLO on 3 GPUs;
- collocated: 1 or 2 engines cannot keep up with the prompts (2.5 x 100 ms x 6/s > 1 engine);
  3 and 4 engines spend 50 % and 37.5 % of their time on prompts and miss the TPOT bound;
- so the most goodput per GPU is 1P-TP1:2D-TP1 (600 tok/s on 3 GPUs), then the 4-GPU layouts.
"""

from __future__ import annotations

import pytest

from pdperf.planner.model import Deployment, WorkloadPoint
from pdperf.planner.profiles import (
    Calibration,
    DecodeParams,
    KVCacheParams,
    MetricQuality,
    ModelParams,
    OverheadParams,
    PlannerError,
    PrefillParams,
    Profile,
)
from pdperf.planner.search import NodeShape, enumerate_deployments, format_table, parse_slos, search, write_topologies
from pdperf.specs import load_topology

pytestmark = pytest.mark.selftest

PARAMS = ModelParams(
    ref_tp=1,
    prefill=PrefillParams(ms_per_ktoken=20.0, tp_exponent=1.0, collocated_factor=2.5),
    decode=DecodeParams(step_ms=10.0, step_tp_exponent=0.0, per_seq_ms_per_ktoken=1.0 / 5.05, per_seq_tp_exponent=1.0),
    kv_cache=KVCacheParams(weights_gb=1.0, bytes_per_token=1000.0),
    overheads=OverheadParams(fixed_ms=20.0, jitter_ms=10.0))
POINT = WorkloadPoint(5000, 100, "rate", 6.0)
SLOS = parse_slos(["p99_ttft_ms <= 2000", "p99_tpot_ms <= 20"])


def profile(bootstrap=()) -> Profile:
    cal = None
    if bootstrap:
        q = MetricQuality(in_sample_mdape=0.0, leave_one_config_out_mdape=None, points=1)
        cal = Calibration(source=["test"], points=1, configs=["x"], tps=[1], isl=[5000], osl=[100], loads=[6.0],
                          requests_per_slot=None, fitted=[], assumed={}, quality={"out_tok_s": q},
                          loco_log_residuals={}, in_sample_log_residuals={}, bootstrap=list(bootstrap))
    return Profile(hardware_id="test", model="gpt-oss-120b", params=PARAMS, calibration=cal)


def test_known_optimum_ranks_first():
    res = search(profile(), POINT, SLOS, budget=4, shape=NodeShape(4, 1), tps=(1,))
    best = res.candidates[0]
    assert best.deployment == Deployment.pd(1, 1, 2, 1)
    assert best.meets_slo and best.goodput_per_gpu == pytest.approx(600 / 3, rel=0.02)
    assert best.slo_values["p99_tpot_ms"] == pytest.approx(11 / 0.7, rel=0.02)
    failing = {c.deployment for c in res.candidates if not c.meets_slo}
    assert Deployment.pd(1, 1, 1, 1) in failing and Deployment.pd(3, 1, 1, 1) in failing
    assert {Deployment.collocated(n, 1) for n in (1, 2, 3, 4)} <= failing
    # every layout that meets the SLO ranks above every one that does not
    flags = [c.meets_slo for c in res.candidates]
    assert flags == sorted(flags, reverse=True)
    assert "1P-TP1:2D-TP1" in format_table(res)


def test_bootstrap_gives_probabilities():
    slower = PARAMS.model_copy(update={"decode": PARAMS.decode.model_copy(update={"step_ms": 14.0})})
    res = search(profile([PARAMS, slower]), POINT, SLOS, budget=4, shape=NodeShape(4, 1), tps=(1,))
    best = res.candidates[0]
    # with 14 ms steps 1P:2D's TPOT is 15 / 0.7 = 21.4 ms: it holds under one parameter set of two
    assert best.p_slo == pytest.approx(0.5)
    assert sum(c.p_best or 0.0 for c in res.candidates) == pytest.approx(1.0)
    assert all(0.0 <= (c.p_best or 0.0) <= 1.0 for c in res.candidates)
    lo, hi = best.goodput_per_gpu_interval
    assert lo <= best.goodput_per_gpu <= hi + 1e-9


def test_enumeration_respects_nixl_rule_and_nodes():
    deps = enumerate_deployments(16, NodeShape(8, 2))
    pd_deps = [d for d in deps if d.kind == "pd"]
    assert all(d.prefill_tp <= d.decode_tp for d in pd_deps)
    assert all(d.gpus <= 16 for d in deps)
    assert Deployment.pd(1, 2, 3, 2, "pack") in deps  # 8 GPUs fit one node
    assert Deployment.pd(2, 4, 2, 4, "spread") in deps  # each role fills one node
    assert Deployment.pd(1, 4, 3, 4, "any") in deps  # decode needs both nodes
    assert Deployment.collocated(2, 8) in deps and Deployment.collocated(1, 16) not in deps
    one_node = enumerate_deployments(8, NodeShape(8, 1), min_gpus=8)
    assert all(d.gpus == 8 and d.placement in ("pack",) for d in one_node if d.kind == "pd")
    assert Deployment.collocated(4, 2) in one_node and Deployment.collocated(2, 2) not in one_node


def test_impossible_budget_is_a_user_error():
    with pytest.raises(PlannerError, match="more than the 8 GPUs"):
        enumerate_deployments(16, NodeShape(8, 1))
    with pytest.raises(PlannerError, match="no TP fits"):
        enumerate_deployments(4, NodeShape(2, 2), tps=(4, 8))
    with pytest.raises(PlannerError, match="predicts ttft_ms and tpot_ms only"):
        parse_slos(["p99_queue_ms <= 100"])


def test_written_topologies_validate(tmp_path):
    res = search(profile(), POINT, SLOS, budget=4, shape=NodeShape(4, 1), tps=(1,))
    paths = write_topologies(res, tmp_path, model="gpt-oss-120b", count=2)
    assert [p.name for p in paths] == ["pd-1p1-2d1-pack.yaml", paths[1].name]
    topo = load_topology(paths[0])
    assert topo.kind == "pd" and topo.prefill.tp == 1 and topo.decode.replicas == 2 and topo.placement == "pack"
    assert "planner" in topo.tags and topo.gpus == 3
