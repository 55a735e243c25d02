"""run_point end to end against the loopback stub: phases, worker processes, one clock, telemetry.

The stub runs on its own thread (StubServerThread) so the synchronous entry point can be
called as the suite calls it. Assertions are on structure and ordering, never on speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdperf.loadgen import reset_prefix_cache, run_point, single_request
from pdperf.loadgen.client import arrival_offsets_s
from pdperf.loadgen.runner import plan_shares, prepare_requests
from pdperf.loadgen.stub_server import StubBehavior, StubServerThread
from pdperf.results import load_point, save_point
from pdperf.specs import SLO, Sweep, Workload
from tests.selftest.test_bad_input import make_tokenizer

pytestmark = pytest.mark.selftest


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def stub():
    with StubServerThread(StubBehavior(ttft_s=0.01, token_interval_s=0.002, prompt_tokens=32)) as server:
        yield server


def workload(kind="concurrency", point=4.0, n=24, warmup=4, osl=6, **sweep_kw) -> Workload:
    return Workload(name="stub-test", isl=32, osl=osl, request_timeout_s=10,
                    slos=[SLO.parse("p99_ttft_ms <= 10000")],
                    sweep=Sweep(kind=kind, points=[point], requests_per_point=n, warmup_requests=warmup, **sweep_kw))


def test_run_point_in_process(stub, tok_dir, tmp_path):
    wl = workload()
    stub.behavior = StubBehavior(ttft_s=0.01, token_interval_s=0.002, prompt_tokens=32)
    r = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=wl, point=4,
                  topology="stub", gpus=2, metrics_urls=[stub.url + "/metrics"], environment={"host": "x"},
                  processes=0)
    assert r.id == "stub/stub-test/c4" and r.sweep_kind == "concurrency" and r.point_value == 4.0
    assert len(r.records) == 28 and sum(r.warmup for r in r.records) == 4
    assert r.summary.requests == 24 and r.summary.requests_ok == 24, r.summary.errors
    measured = [x for x in r.records if not x.warmup]
    assert r.duration_s == pytest.approx(max(x.end_s for x in measured) - min(x.scheduled_s for x in measured))
    warm_end = max(x.end_s for x in r.records if x.warmup)
    assert all(x.scheduled_s > warm_end for x in measured)  # warm-up is its own phase
    assert r.summary.throughput.output_tok_per_s_per_gpu is not None
    assert r.summary.slos[0].passed is True
    c = r.client
    assert c.processes == 0 and c.cpu_s > 0 and c.cpu_s_per_1k_tokens > 0
    assert c.token_accounting == {"final_usage_exact": 24}
    assert c.request_options == {"temperature": None, "per_chunk_usage": False}
    assert c.output_length_mismatch == 0 and c.input_length_mismatch == 0
    assert c.prefix_cache_reset == "unsupported"  # the stub has no such endpoint: skipped quietly
    assert "output_length_mismatch" not in r.flags
    # telemetry brackets the measured phase only: warm-up tokens are outside the window
    assert r.telemetry.generation_tokens == 24 * 6
    assert r.environment.host == "x"
    save_point(tmp_path / "p.json", r)
    back = load_point(tmp_path / "p.json")
    assert back.records[5] == r.records[5] and back.client == r.client and back.summary == r.summary
    assert back.telemetry == r.telemetry and back.environment == r.environment


def test_run_point_with_two_worker_processes_shares_one_clock(stub, tok_dir):
    stub.behavior = StubBehavior(ttft_s=0.01, token_interval_s=0.002, prompt_tokens=32)
    r = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=workload(point=4, n=16),
                  point=4, topology="stub", gpus=0, processes=2)
    measured = [x for x in r.records if not x.warmup]
    assert {x.worker for x in measured} == {0, 1}
    assert r.summary.requests_ok == 16
    assert len(r.client.worker_cpu_s) == 2 and r.client.processes == 2
    # every slot of both processes starts at the same t0: one schedule, one clock
    t0 = min(x.scheduled_s for x in measured)
    firsts = [x for x in measured if x.scheduled_s == t0]
    assert len(firsts) == 4 and {x.worker for x in firsts} == {0, 1}
    assert sorted(x.index for x in measured) == list(range(4, 20))


def test_open_loop_point_with_cap_reports_queueing(stub, tok_dir):
    stub.behavior = StubBehavior(ttft_s=0.03, token_interval_s=0.002, prompt_tokens=32)
    wl = workload(kind="rate", point=200.0, n=12, warmup=0, max_concurrency=1)
    r = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=wl, point=200.0,
                  topology="stub", gpus=0, processes=0)
    assert r.point_id == "r200" and r.sweep_kind == "rate"
    assert r.summary.requests_ok == 12
    assert r.summary.stat("queue_ms", "p90") > 0
    t0 = min(x.scheduled_s for x in r.records)
    offsets = sorted(x.scheduled_s - t0 for x in r.records)
    assert offsets == pytest.approx(list(arrival_offsets_s(12, 200.0, seed=wl.seed)), abs=1e-9)


def test_duration_bound_stops_sending(stub, tok_dir):
    stub.behavior = StubBehavior(ttft_s=0.02, prompt_tokens=32)
    wl = workload(point=2, n=200, warmup=0, max_duration_s=0.2)
    r = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=wl, point=2,
                  topology="stub", gpus=0, processes=0, reset_cache=False)
    assert 2 <= r.summary.requests < 200
    assert r.client.prefix_cache_reset == "skipped"


def test_failed_requests_are_recorded_not_raised(stub, tok_dir):
    stub.behavior = StubBehavior(failure="http_500")
    r = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=workload(n=5, warmup=0),
                  point=4, topology="stub", gpus=0, processes=0)
    assert r.summary.requests_failed == 5 and r.summary.errors == {"http_5xx": 5}
    assert r.summary.slos[0].passed is False


def test_plan_shares_deals_one_arrival_process_round_robin(tok_dir):
    wl = workload(kind="rate", point=5.0, n=10, warmup=2)
    warm, measured = prepare_requests(wl, model="m", tokenizer_path=tok_dir, count=10, warmup=2, salt="s")
    shares = plan_shares(base_url="http://127.0.0.1:1", api="completions", timeout_s=5, kind="rate", point=5.0,
                         processes=3, warmup=warm, measured=measured, max_concurrency=4, seed=0)
    assert [s.max_concurrency for s in shares] == [2, 1, 1]
    merged = sorted(o for s in shares for o in s.measured_offsets_s)
    assert merged == pytest.approx(list(arrival_offsets_s(10, 5.0, seed=0)))
    assert sorted(r.index for s in shares for r in s.measured) == list(range(2, 12))
    closed = plan_shares(base_url="http://127.0.0.1:1", api="completions", timeout_s=5, kind="concurrency",
                         point=5, processes=2, warmup=warm, measured=measured)
    assert [s.concurrency for s in closed] == [3, 2]
    assert [len(s.measured) for s in closed] == [6, 4]
    assert len(plan_shares(base_url="u", api="completions", timeout_s=5, kind="concurrency", point=1,
                           processes=8, warmup=[], measured=measured)) == 1  # never more workers than slots


def test_perf_counter_is_one_clock_across_processes():
    """perf_counter is CLOCK_MONOTONIC on Linux: a child's reading falls between the parent's."""
    assert time.get_clock_info("perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)"
    before = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import time; print(repr(time.perf_counter()))"],
                         capture_output=True, text=True, timeout=30, check=True)
    after = time.perf_counter()
    assert before <= float(out.stdout) <= after


def test_single_request_returns_the_text(stub):
    stub.behavior = StubBehavior(ttft_s=0.0, tokens_per_chunk=2)
    rec, text = single_request(stub.url, "stub-model", "hello there", 5)
    assert rec.ok and rec.output_tokens == 5 and text == " tok" * 5
    rec, text = single_request(stub.url, "stub-model", "hello there", 3, api="chat")
    assert rec.ok and text == " tok" * 3
    assert stub.last_body["messages"] == [{"role": "user", "content": "hello there"}]


def test_reset_prefix_cache_never_raises(stub):
    assert reset_prefix_cache(stub.url, "m") == "unsupported"
    assert reset_prefix_cache("http://127.0.0.1:9", "m", timeout_s=1).startswith("failed:")


def test_a_point_on_gpus_keeps_the_hosts_gpu_clocks(stub, tok_dir, tmp_path, monkeypatch):
    """Client-side only (the stub is the server): a stand-in nvidia-smi plays 2 GPUs."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho '0, 1980, 650, 61, 0x0'\necho '1, 1755, 700, 80, 0x4'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    stub.behavior = StubBehavior(ttft_s=0.01, token_interval_s=0.002, prompt_tokens=32)
    for processes in (0, 2):
        r = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=workload(n=8),
                      point=4, topology="stub", gpus=2, environment={"gpus": 2}, processes=processes)
        gpu = r.telemetry.gpu["per_gpu"]
        assert gpu["1"]["clock_reasons_busy"] == ["sw_power_cap"] and gpu["0"]["samples"] >= 2  # start and stop
    cpu = run_point(base_url=stub.url, model="stub-model", tokenizer_path=tok_dir, workload=workload(n=8), point=4,
                    topology="stub", gpus=0, environment={"gpus": 0}, processes=0)
    assert not cpu.telemetry.gpu  # CPU runs never call nvidia-smi
