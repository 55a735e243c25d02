"""Profile fitting on synthetic data (known parameters in, the same out), identifiability,
the calibration CSV loader's errors, profile files and TP scaling.

The synthetic points are the model's own predictions for known parameters, so a fit that
works must find parameters that reproduce them to well under a percent and land near the
truth wherever the data identifies a parameter.
"""

from __future__ import annotations

import json
import math

import pytest

from pdperf.planner.facts import model_facts
from pdperf.planner.fit import calibrate, fit_params, identify, initial_params, residuals
from pdperf.planner.model import Deployment, WorkloadPoint, solve
from pdperf.planner.profiles import (
    DecodeParams,
    KVCacheParams,
    MeasuredPoint,
    ModelParams,
    OverheadParams,
    PlannerError,
    PrefillParams,
    Profile,
    load_profile,
    load_study_csv,
    resolve,
    role_costs,
    save_profile,
)

pytestmark = pytest.mark.selftest

FACTS = model_facts("gpt-oss-120b")
TRUE = ModelParams(
    ref_tp=2,
    prefill=PrefillParams(ms_per_ktoken=11.0, tp_exponent=0.8),
    decode=DecodeParams(step_ms=6.0, step_tp_exponent=0.2, per_seq_ms_per_ktoken=0.05, per_seq_tp_exponent=1.0),
    kv_cache=KVCacheParams(weights_gb=FACTS.weights_gb, bytes_per_token=FACTS.kv_bytes_per_token),
    overheads=OverheadParams(fixed_ms=80.0, jitter_ms=40.0, pd_extra_ms=0.0, convoy=0.3))


def synthetic(params: ModelParams, deployments, loads, *, isl=5000, osl=250, rps=5) -> list[MeasuredPoint]:
    out = []
    for dep in deployments:
        for c in loads:
            pt = WorkloadPoint(isl, osl, "concurrency", c, rps)
            p = solve(resolve(params, dep), pt, dep)
            out.append(MeasuredPoint(config=dep.label, deployment=dep, point=pt, med_ttft_ms=p.med_ttft_ms,
                                     med_tpot_ms=p.med_tpot_ms, out_tok_s=p.out_tok_s, p99_ttft_ms=p.p99_ttft_ms))
    return out


def test_fit_recovers_known_parameters():
    deps = [Deployment.pd(1, 2, 1, 2), Deployment.pd(2, 2, 1, 2)]
    points = synthetic(TRUE, deps, (4, 16, 32))
    start = initial_params(points, FACTS)  # from the data's own scale, far from the truth
    fitted, plan, _ = fit_params(points, start, max_iter=40)
    res = residuals(fitted, points)
    worst = max(abs(v) for m in ("med_ttft_ms", "med_tpot_ms", "out_tok_s") for v in res[m] if v is not None)
    assert worst < 0.01, res  # reproduces every point within 1 %
    assert fitted.decode.step_ms == pytest.approx(6.0, rel=0.05)
    assert fitted.decode.per_seq_ms_per_ktoken == pytest.approx(0.05, rel=0.05)
    assert fitted.prefill.ms_per_ktoken == pytest.approx(11.0, rel=0.10)
    assert fitted.overheads.fixed_ms + fitted.overheads.jitter_ms == pytest.approx(120.0, rel=0.10)
    # one TP and PD only: the exponents and the collocated terms are not identified, and say so
    assert "decode.per_seq_tp_exponent" in plan.assumed and "overheads.convoy" in plan.assumed
    assert "kv_cache.effective_ktokens_at_ref_tp" in plan.assumed  # nothing saturated: physical capacity


def test_identify_follows_the_data():
    colloc_two_tps = [Deployment.collocated(2, 4), Deployment.collocated(4, 2)]
    pts = synthetic(TRUE, colloc_two_tps, (4, 16))
    free = {fp.path for fp in identify(pts, TRUE).free}
    assert {"prefill.tp_exponent", "decode.step_tp_exponent", "overheads.convoy"} <= free
    assert "overheads.pd_extra_ms" not in free and "prefill.collocated_factor" not in free
    both = pts + synthetic(TRUE, [Deployment.pd(1, 2, 1, 2)], (4, 16))
    free = {fp.path for fp in identify(both, TRUE).free}
    assert {"overheads.pd_extra_ms", "prefill.collocated_factor"} <= free
    two_isl = synthetic(TRUE, [Deployment.pd(1, 2, 1, 2)], (4, 16)) + \
        synthetic(TRUE, [Deployment.pd(1, 2, 1, 2)], (4, 16), isl=1000)
    free = {fp.path for fp in identify(two_isl, TRUE).free}
    assert {"prefill.ms_per_request", "decode.per_seq_ms"} <= free


def test_calibrate_records_quality_loco_and_bootstrap():
    deps = [Deployment.pd(1, 2, 1, 2), Deployment.pd(2, 2, 1, 2)]
    points = synthetic(TRUE, deps, (4, 32))
    prof = calibrate(points, hardware_id="test-hw", model="gpt-oss-120b", facts=FACTS, source=["synthetic"],
                     bootstrap=2, seed=1)
    cal = prof.calibration
    assert cal is not None and cal.points == 4 and len(cal.bootstrap) == 2
    assert cal.quality["med_tpot_ms"].in_sample_mdape < 1.0
    assert cal.quality["med_tpot_ms"].leave_one_config_out_mdape is not None
    assert len(cal.loco_log_residuals["out_tok_s"]) == 4
    assert cal.tps == [2] and cal.isl == [5000] and cal.requests_per_slot == 5


def test_profile_round_trip_and_errors(tmp_path):
    prof = Profile(hardware_id="h100-x8", model="gpt-oss-120b", params=TRUE)
    path = tmp_path / "h100-x8" / "gpt-oss-120b.json"
    save_profile(path, prof)
    assert load_profile(path) == prof
    assert load_profile(tmp_path, hardware_id="h100-x8", model="gpt-oss-120b") == prof  # a store folder
    with pytest.raises(PlannerError, match="no such profile"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(PlannerError, match="not 'llama'"):
        load_profile(path, model="llama")
    bad = json.loads(path.read_text())
    bad["params"]["decode"]["step_ms"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PlannerError, match="params.decode.step_ms"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(PlannerError, match="not a planner profile"):
        load_profile(tmp_path / "other.json")


def test_tp_scaling_and_kv_capacity():
    two, four = role_costs(TRUE, 1, 2), role_costs(TRUE, 1, 4)
    assert four.prefill_s_per_token == pytest.approx(two.prefill_s_per_token / 2 ** 0.8)
    assert four.step_s == pytest.approx(two.step_s / 2 ** 0.2)
    assert four.per_seq_s_per_token == pytest.approx(two.per_seq_s_per_token / 2)
    coll = role_costs(TRUE.model_copy(update={"prefill": TRUE.prefill.model_copy(update={"collocated_factor": 2.0})}),
                      1, 2, collocated=True)
    assert coll.prefill_s_per_token == pytest.approx(2 * two.prefill_s_per_token)
    kv = TRUE.kv_cache
    assert kv.capacity_tokens(2, 2) == pytest.approx((2 * 80 * 0.9 - 65) * 1e9 / 73728)
    eff = kv.model_copy(update={"effective_ktokens_at_ref_tp": 200.0})
    assert eff.capacity_tokens(4, 2) == pytest.approx(200_000 * (4 * 72 - 65) / (2 * 72 - 65))
    assert KVCacheParams(weights_gb=200, bytes_per_token=1000).capacity_tokens(1, 1) == 0.0  # weights do not fit


CSV_HEADER = ("config,kind,prefill_or_collocated_replicas,prefill_or_collocated_tp,decode_replicas,decode_tp,gpus,"
              "concurrency,requests,med_ttft_ms,p99_ttft_ms,med_tpot_ms,p99_tpot_ms,p99_itl_ms,out_tok_s,req_s")


def write_csv(tmp_path, *rows: str, header: str = CSV_HEADER):
    p = tmp_path / "cal.csv"
    p.write_text("\n".join((header, *rows)) + "\n")
    return p


def test_study_csv_loads(tmp_path):
    p = write_csv(tmp_path, "a,collocated,2,4,0,0,8,4,20,145,387,5.37,6.20,7.0,645,2.58",
                  "b,pd,1,2,3,2,8,16,80,300,900,7.0,8.0,9.0,1500,6.0")
    pts = load_study_csv(p, isl=5000, osl=250)
    assert pts[0].deployment == Deployment.collocated(2, 4)
    assert pts[1].deployment == Deployment.pd(1, 2, 3, 2)
    assert pts[1].point.requests_per_slot == 5 and pts[1].point.value == 16
    assert pts[0].p99_ttft_ms == 387


@pytest.mark.parametrize("rows, header, kwargs, message", [
    (("a,collocated,2,4,0,0,8,4,20,145,387,5.37,6.20,7.0,645,2.58",), CSV_HEADER.replace("med_tpot_ms", "tpot"),
     {"isl": 5000, "osl": 250}, "missing column(s) med_tpot_ms"),
    (("a,collocated,2,4,0,0,8,4,20,fast,387,5.37,6.20,7.0,645,2.58",), CSV_HEADER, {"isl": 5000, "osl": 250},
     "cal.csv:2: column 'med_ttft_ms' is 'fast', not a number"),
    (("a,hybrid,2,4,0,0,8,4,20,145,387,5.37,6.20,7.0,645,2.58",), CSV_HEADER, {"isl": 5000, "osl": 250},
     "column 'kind' is 'hybrid'"),
    (("a,collocated,2,4,0,0,6,4,20,145,387,5.37,6.20,7.0,645,2.58",), CSV_HEADER, {"isl": 5000, "osl": 250},
     "column 'gpus' is 6 but 2xTP4 uses 8"),
    (("a,collocated,2,4,0,0,8,4,20,145,387,5.37,6.20,7.0,645,2.58",), CSV_HEADER, {},
     "no 'isl' column; pass --isl"),
    ((), CSV_HEADER, {"isl": 5000, "osl": 250}, "no rows"),
])
def test_study_csv_errors_name_the_fix(tmp_path, rows, header, kwargs, message):
    p = write_csv(tmp_path, *rows, header=header)
    with pytest.raises(PlannerError) as e:
        load_study_csv(p, **kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_study_csv_missing_file(tmp_path):
    with pytest.raises(PlannerError, match="no such calibration CSV"):
        load_study_csv(tmp_path / "nope.csv", isl=1, osl=1)


def test_model_facts():
    assert FACTS.kv_bytes_per_token == 36 * 8 * 64 * 2 * 2
    with pytest.raises(Exception, match="--weights-gb"):
        model_facts("no-such-model")
    assert model_facts("no-such-model", weights_gb=10, kv_bytes_per_token=1000).weights_gb == 10
    assert math.isclose(model_facts("llama-3.1-8b").kv_bytes_per_token, 131072)


def test_kv_bandwidth_from_ray_midpoints_is_sized_by_the_model():
    """A Ray PD point's KV bytes are the midpoint of a x4 bucket (84 MB stood for 34-134 MB on one
    H200): the start takes the transfer's size from ISL x the model's KV bytes per token instead;
    exact bytes (the vllm backend) are used as measured."""
    dep = Deployment(kind="pd", prefill_replicas=1, prefill_tp=1, decode_replicas=1, decode_tp=1)
    pt = WorkloadPoint(1024, 256, "concurrency", 4, 5)
    facts = model_facts("llama-3.1-8b")  # 128 KiB of KV per token: 134 MB per 1024-token prompt

    def point(**kv) -> MeasuredPoint:
        return MeasuredPoint(config="pd", deployment=dep, point=pt, med_ttft_ms=170.0, med_tpot_ms=5.3,
                             out_tok_s=589.0, **kv)

    ray = point(kv_bandwidth_gb_s=83.89e6 / 0.036 / 1e9, kv_transfer_s=0.036, kv_bytes_estimated=True)
    start = initial_params([ray], facts)
    assert start.kv_transfer.pack_gb_s == pytest.approx(1024 * 131072 / 0.036 / 1e9)  # 3.73, not 2.33
    assert "1 of them sized by the model's 131072 KV bytes per token" in start.kv_transfer.source
    exact = point(kv_bandwidth_gb_s=3.0, kv_transfer_s=0.036)
    assert initial_params([exact], facts).kv_transfer.pack_gb_s == pytest.approx(3.0)
