"""Smoke tier: every topology the cluster can hold answers, streams exact lengths, and PD's KV
handoff is right (greedy output through PD equals the collocated engine's, token for token)."""

from __future__ import annotations

import json

import pytest

from fixtures.reporting import confirm_path, point_path
from pdperf.gate import judge, write_baseline
from pdperf.greedy import compare_greedy, greedy_tokens
from pdperf.loadgen.runner import single_request
from pdperf.metrics import tpot_ms, ttft_ms
from pdperf.models import tokenizer_covers_vocab
from pdperf.results import load_point

pytestmark = pytest.mark.smoke

PROMPTS = ["def fibonacci(n):\n    ", "class HTTPServer:\n    def __init__(self", "import os\nimport sys\n\n"]
# The greedy check's prompts differ in their context and end alike: outputs that differ between them
# come from the context, which reaches a PD decode engine only through the KV handoff. (A model that
# reads only the last token would answer these alike, and a wrong handoff would match too.)
GREEDY_SUFFIX = "\n\nresult = "
GREEDY_PROMPTS = [p.rstrip() + GREEDY_SUFFIX for p in PROMPTS]


@pytest.fixture
def smoke_workload(pdperf_ctx, topology):
    name = f"smoke-{topology.device}"
    if name not in pdperf_ctx.all_workloads:
        pytest.fail(f"workloads/{name}.yaml is missing: the smoke tier needs it", pytrace=False)
    return pdperf_ctx.all_workloads[name]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_stream_exact_length(endpoint, api, record_property):
    rec, text = single_request(endpoint.base_url, endpoint.model_id, PROMPTS[0], 16, api=api)
    assert rec.error is None, f"{endpoint.name} /{api}: {rec.error}: {rec.error_detail}"
    assert rec.output_tokens == 16, f"{endpoint.name}: asked for 16 tokens (ignore_eos), got {rec.output_tokens}"
    if tokenizer_covers_vocab(endpoint.tokenizer_path):  # else random weights may pick ids without text
        assert text, f"{endpoint.name}: empty text"
    assert ttft_ms(rec) is not None and tpot_ms(rec) is not None
    record_property("ttft_ms", round(ttft_ms(rec), 2))
    record_property("tpot_ms", round(tpot_ms(rec), 2))


def test_small_load_point(endpoint, smoke_workload, measure):
    result = measure(endpoint, smoke_workload, smoke_workload.sweep.points[0])
    s = result.summary
    assert s.requests_failed == 0, f"{result.id}: {s.errors}"
    measured = [r for r in result.records if not r.warmup]
    assert all(r.output_tokens == smoke_workload.osl for r in measured), "output lengths are not exact"
    assert s.metrics["ttft_ms"].n == len(measured)
    assert not [f for f in result.flags if f.startswith("replica_restart_during_load")], result.flags
    if endpoint.topology.kind == "pd":  # the KV moved over what the placement expects (pdperf.network)
        assert not result.telemetry.kv_path_problem, f"{result.id}: {result.telemetry.kv_path_problem}"
    # the model the engines serve (not the name requests carry): bands and the gate compare it
    assert result.environment.model == endpoint.model, result.environment
    if endpoint.backend != "external":  # Ray and vLLM serve a models.py key or folder under the topology's name
        assert endpoint.model != endpoint.model_id, (endpoint.model, endpoint.model_id)


@pytest.mark.topology_kind("collocated")
@pytest.mark.topology_tag("cpu")
def test_gate_measures_a_regression_again(endpoint, smoke_workload, measure, thresholds, run_dir, tmp_path):
    """The sweep gate's confirmation on the real stack: against a baseline made 3x faster than this
    machine, the point regresses, is measured again on the same deployment, regresses again, and
    the re-measurement is saved beside the points, not among them. (A regression that does not
    repeat, status 'unconfirmed', cannot be produced on demand here: tests/selftest/test_checks.py.)
    Then the re-measurement joins the baseline as its band's second run, and the gate's limits
    apply from that run."""
    workload = smoke_workload.model_copy(update={"name": f"{smoke_workload.name}-gate-check"})
    first = measure(endpoint, workload, workload.sweep.points[0])
    # allow_flagged: on a busy 2-core machine a point can be flagged client_loop_lag, which the
    # recording path refuses (tested in the selftest); here the gate's mechanics are the subject
    [path] = write_baseline(tmp_path, [first], allow_flagged=True)
    doc = json.loads(path.read_text())
    entry = doc["points"][first.point_id]
    entry["samples"] = {m: [x / 3 for x in v] for m, v in entry["samples"].items()}
    entry["request_stats"] = {m: {s: [x / 3 for x in v] for s, v in by.items()}
                              for m, by in entry["request_stats"].items()}
    path.write_text(json.dumps(doc))

    again = []

    def remeasure(attempt: int):
        again.append(measure(endpoint, workload, first.point_value, attempt=attempt))
        return again[-1]

    v = judge(first, test_id="gate-check", baselines_root=tmp_path, thresholds=thresholds,
                     remeasure=remeasure, confirm_attempts=1)
    assert v.gate.status == "regressed", v.gate.message()
    assert [c.status for c in v.gate.confirmations] == ["regressed"], v.gate.confirmations
    assert "confirmed by 1 re-measurement" in v.gate.message()
    saved = load_point(confirm_path(run_dir, first.id, 1))
    assert saved.started_at == again[0].started_at != first.started_at
    assert load_point(point_path(run_dir, first.id)).started_at == first.started_at

    # The band (docs/METHODOLOGY.md, rule 5), on the same real points: the 3x-faster run plus the
    # re-measurement as a second run; the limit then applies from the band's worst run.
    entry["runs"] = [{**r, "statistics": {m: {s: x / 3 for s, x in by.items()} for m, by in r["statistics"].items()}}
                     for r in entry["runs"]]
    path.write_text(json.dumps(doc))
    write_baseline(tmp_path, again, add_run=True, allow_flagged=True)
    banded = judge(first, test_id="gate-check", baselines_root=tmp_path, thresholds=thresholds).gate
    judged = [v for v in banded.verdicts if v.verdict != "insufficient"]
    assert judged and all(v.band_runs == 2 for v in judged), banded.message()
    for v in judged:  # the size that decided is against the re-measurement (the worst run), not the first
        beyond = v.current_value / v.band_high > 1 + v.threshold
        # regressed needs the size beyond the worst run's limit; beyond it, a verdict can still be
        # 'unchanged' when the change is not significant (a p99 over 12 requests: CI 0.96-8.77 seen)
        assert beyond or v.verdict != "regressed", v.message()
        assert v.verdict == "regressed" or not beyond or "not significant" in v.message(), v.message()
        assert "of the worst run" in v.message()


@pytest.mark.topology_kind("pd")
@pytest.mark.last_in_topology
def test_pd_greedy_matches_collocated(endpoint, reference_endpoint, record_property):
    """PD's greedy token ids equal the collocated engine's (pdperf.greedy says why ids, why these
    prompts, and what a near tie is). Passes when no prompt differs and at least two prompts
    matched with different ids; skipped as inconclusive when the matches cannot show a wrong
    handoff (every prompt answered alike, or near ties decided the rest). PD answers every prompt
    before the reference is asked: where the two cannot be up together (one GPU), the reference's
    deployment then evicts PD (so this test runs after its topology's others)."""
    answers = {}
    for prompt in GREEDY_PROMPTS:
        try:
            answers[prompt] = greedy_tokens(endpoint.base_url, endpoint.model_id, prompt, 24)
        except RuntimeError as e:
            pytest.fail(f"greedy check, prompt {prompt!r} through {endpoint.name}: {e}", pytrace=False)
    ref_endpoint = reference_endpoint.endpoint()
    record_property("greedy_reference", f"{ref_endpoint.name}, "
                    + ("up beside PD" if reference_endpoint.together else "deployed after PD (one at a time)"))
    matched, near_ties = {}, []
    for prompt, pd in answers.items():
        try:
            ref = greedy_tokens(ref_endpoint.base_url, ref_endpoint.model_id, prompt, 24)
        except RuntimeError as e:
            pytest.fail(f"greedy check, prompt {prompt!r} through {ref_endpoint.name}: {e}", pytrace=False)
        verdict = compare_greedy(pd, ref)
        assert verdict.status != "differs", (
            f"greedy output differs between {endpoint.name} (PD) and {ref_endpoint.name} (collocated) for "
            f"prompt {prompt!r}: the KV handoff is wrong; {verdict.message}")
        if verdict.status == "near_tie":
            near_ties.append(f"{prompt!r}: {verdict.message}")
        else:
            matched[prompt] = ref
    record_property("greedy_token_ids", json.dumps([m.ids for m in matched.values()]))
    known = [x for m in matched.values() for x in m.margins if x is not None]
    if known:
        record_property("greedy_min_margin_nats", round(min(known), 4))
    if len({tuple(m.ids) for m in matched.values()}) < 2:
        pytest.skip(f"inconclusive: no prompt's ids differ between PD and collocated, but "
                    f"{len(matched)} of {len(GREEDY_PROMPTS)} prompts (different contexts, same ending "
                    f"{GREEDY_SUFFIX!r}) matched with fewer than two distinct answers"
                    + (f"; near ties: {'; '.join(near_ties)}" if near_ties else "")
                    + ": the model's output does not show its context, so a wrong KV handoff would match too "
                    "(use the project's built model or real weights)")
