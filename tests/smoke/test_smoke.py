"""Smoke tier: every topology the cluster can hold answers, streams exact lengths, and PD's KV
handoff is right (greedy output through PD equals the collocated engine's, token for token)."""

from __future__ import annotations

import pytest

from pdperf.loadgen.runner import single_request
from pdperf.metrics import tpot_ms, ttft_ms
from pdperf.models import tokenizer_covers_vocab

pytestmark = pytest.mark.smoke

PROMPTS = ["def fibonacci(n):\n    ", "class HTTPServer:\n    def __init__(self", "import os\nimport sys\n\n"]


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


@pytest.mark.topology_kind("pd")
def test_pd_greedy_matches_collocated(endpoint, reference_endpoint):
    for prompt in PROMPTS:
        _, pd_text = single_request(endpoint.base_url, endpoint.model_id, prompt, 24)
        _, ref_text = single_request(reference_endpoint.base_url, reference_endpoint.model_id, prompt, 24)
        assert pd_text == ref_text, (
            f"greedy output differs between {endpoint.name} (PD) and {reference_endpoint.name} (collocated) for "
            f"prompt {prompt!r}: the KV handoff is wrong.\nPD:         {pd_text!r}\ncollocated: {ref_text!r}")


def test_small_load_point(endpoint, smoke_workload, measure):
    result = measure(endpoint, smoke_workload, smoke_workload.sweep.points[0])
    s = result.summary
    assert s["requests_failed"] == 0, f"{result.id}: {s['errors']}"
    measured = [r for r in result.records if not r.warmup]
    assert all(r.output_tokens == smoke_workload.osl for r in measured), "output lengths are not exact"
    assert s["metrics"]["ttft_ms"]["n"] == len(measured)
    assert not [f for f in result.flags if f.startswith("replica_restart_during_load")], result.flags
