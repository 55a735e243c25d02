"""The fault proxy (pdperf.inject.FaultPlan) and the client's stalled-stream timeout, against the
loopback stub: what a stalled stream and a window of 503/429 answers become, request by request
and in a point's verdict. The same faults in front of the real server: tests/faults/test_faults.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pdperf.gate.point import judge
from pdperf.gate.thresholds import load_thresholds
from pdperf.inject import FaultCounts, FaultPlan, SlowdownProxy, SlowdownProxyProcess, main, sse_events_end
from pdperf.loadgen.client import PreparedRequest, StreamingClient, build_body
from pdperf.loadgen.runner import run_point
from pdperf.loadgen.stub_server import StubBehavior, StubOpenAIServer, StubServerProcess
from pdperf.results import RequestRecord
from pdperf.specs import Sweep, Workload
from tests.selftest.test_bad_input import make_tokenizer

pytestmark = pytest.mark.selftest


# -- the plan, pure ------------------------------------------------------------------------------

def test_plan_first_k_requests_answer_the_status():
    plan = FaultPlan(status=503, status_first=2)
    assert [plan.decide(i, 0.0) for i in range(3)] == [(503, None), (503, None), (None, None)]


def test_plan_status_window_is_time_since_the_first_request():
    plan = FaultPlan(status=429, status_for_s=5.0)
    assert plan.decide(0, 0.0) == (429, None) and plan.decide(40, 4.9) == (429, None)
    assert plan.decide(41, 5.0) == (None, None)


def test_plan_stalls_every_nth_stream_and_a_status_goes_first():
    plan = FaultPlan(stall_after_events=3, stall_every=2)
    assert [plan.decide(i, 0.0) for i in range(4)] == [(None, 3), (None, None), (None, 3), (None, None)]
    both = FaultPlan(status=503, status_first=1, stall_after_events=0)
    assert both.decide(0, 0.0) == (503, None) and both.decide(1, 0.0) == (None, 0)
    assert not FaultPlan().active and FaultPlan().decide(0, 0.0) == (None, None)


@pytest.mark.parametrize("kwargs,message", [
    ({"status": 404, "status_first": 1}, "fault status 404: use one of"),
    ({"status": 503}, "say for which requests"),
    ({"status_first": 3}, "without a status"),
    ({"status": 503, "status_first": 0}, "status_first 0: must be >= 1"),
    ({"status": 429, "status_for_s": 0}, "status_for_s 0: must be > 0"),
    ({"stall_after_events": -1}, "stall_after_events -1"),
    ({"stall_after_events": 2, "stall_every": 0}, "stall_every 0"),
])
def test_plan_rejects_what_it_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FaultPlan(**kwargs)


def test_plan_from_json_names_unknown_keys():
    assert FaultPlan.from_json('{"status": 503, "status_first": 4}') == FaultPlan(status=503, status_first=4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stall_after'\]"):
        FaultPlan.from_json('{"stall_after": 3}')


def test_sse_events_end_counts_whole_events():
    buf = b"data: a\n\ndata: b\n\ndata: c"
    assert sse_events_end(buf, 1) == (len(b"data: a\n\n"), 1)
    assert sse_events_end(buf, 5) == (len(b"data: a\n\ndata: b\n\n"), 2)  # the third is not whole yet
    assert sse_events_end(b"data: a", 1) == (0, 0)


def test_bad_faults_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--upstream", "http://127.0.0.1:1", "--slowdown", "0", "--faults", '{"status": 503}'])
    assert e.value.code == 2 and "--faults: fault status 503: say for which requests" in capsys.readouterr().err


# -- the client's stalled-stream timeout and the proxy, in one event loop ------------------------

async def send(url: str, n: int, *, idle_timeout_s: float | None, timeout_s: float = 10.0,
               max_tokens: int = 8) -> list[RequestRecord]:
    body = build_body(model="stub-model", prompt="a b c", max_tokens=max_tokens)
    async with StreamingClient(url, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s) as client:
        return [await client.send(PreparedRequest(index=i, body=body, input_tokens=3, output_tokens=max_tokens),
                                  time.perf_counter()) for i in range(n)]


async def through_proxy(behavior: StubBehavior, plan: FaultPlan, n: int, **kw) -> tuple[list[RequestRecord], FaultCounts]:
    async with StubOpenAIServer(behavior) as stub, SlowdownProxy(stub.url, 0.0, faults=plan) as proxy:
        return await send(proxy.url, n, **kw), proxy.fault_counts


def test_first_k_requests_answered_503_then_served():
    recs, counts = asyncio.run(through_proxy(StubBehavior(), FaultPlan(status=503, status_first=2), 3,
                                             idle_timeout_s=None))
    assert [r.error for r in recs] == ["http_5xx", "http_5xx", None]
    assert (recs[0].error_detail or "").startswith("HTTP 503: ") and "injected HTTP 503" in (recs[0].error_detail or "")
    assert counts == FaultCounts(requests=3, answered_status=2, stalled=0)


def test_429_is_an_http_4xx_that_names_the_status():
    recs, _ = asyncio.run(through_proxy(StubBehavior(), FaultPlan(status=429, status_for_s=60), 2, idle_timeout_s=None))
    assert [r.error for r in recs] == ["http_4xx", "http_4xx"]
    assert (recs[0].error_detail or "").startswith("HTTP 429: ") and "Too Many Requests" in (recs[0].error_detail or "")


def test_stalled_stream_ends_at_the_idle_timeout_with_its_tokens_so_far():
    t0 = time.monotonic()
    recs, counts = asyncio.run(through_proxy(StubBehavior(), FaultPlan(stall_after_events=3, stall_every=2), 2,
                                             idle_timeout_s=0.4, timeout_s=30))
    stalled, served = recs
    assert stalled.error == "timeout" and stalled.output_tokens == 3 and len(stalled.chunk_times_s) == 3
    assert stalled.error_detail == ("stream stalled: no token for 0.4 s after 3 tokens "
                                    "(the workload's stream_idle_timeout_s)")
    assert served.ok and served.output_tokens == 8
    assert counts.stalled == 1 and counts.requests == 2
    # seen at the idle timeout (within a quarter of it, plus a loaded machine's slack), not at the 30 s total
    assert 0.4 <= time.monotonic() - t0 < 3.0


def test_stall_without_idle_timeout_waits_for_the_total_timeout():
    recs, _ = asyncio.run(through_proxy(StubBehavior(), FaultPlan(stall_after_events=2), 1, idle_timeout_s=None,
                                        timeout_s=0.5))
    assert recs[0].error == "timeout" and recs[0].error_detail == (
        "not finished within the 0.5 s request timeout after 2 tokens")


def test_idle_timeout_does_not_bound_the_first_token_or_a_steady_stream():
    # TTFT 1.5 s and 0.1 s between tokens, with an idle timeout of 0.75 s: time to first token is a
    # measurement (queueing under load), only a gap after it is a stall
    async def run() -> list[RequestRecord]:
        async with StubOpenAIServer(StubBehavior(ttft_s=1.5, token_interval_s=0.1)) as stub:
            return await send(stub.url, 1, idle_timeout_s=0.75, max_tokens=6)
    (rec,) = asyncio.run(run())
    assert rec.ok and rec.output_tokens == 6, rec.error_detail


def test_stall_with_fewer_events_than_asked_is_still_held():
    recs, counts = asyncio.run(through_proxy(StubBehavior(), FaultPlan(stall_after_events=50), 1, idle_timeout_s=None,
                                             timeout_s=0.5, max_tokens=3))
    assert recs[0].error == "timeout" and counts.stalled == 1  # every event forwarded, then no end


def test_idle_timeout_must_be_positive():
    with pytest.raises(ValueError, match="stream idle timeout 0 s: must be > 0"):
        StreamingClient("http://127.0.0.1:1", idle_timeout_s=0)


def test_workload_stream_idle_timeout_default_and_checks():
    sweep = Sweep(kind="concurrency", points=[1], requests_per_point=1)
    assert Workload(name="w", isl=8, osl=4, sweep=sweep).stream_idle_timeout_s == 120.0
    assert Workload(name="w", isl=8, osl=4, sweep=sweep, stream_idle_timeout_s=None).stream_idle_timeout_s is None
    with pytest.raises(ValueError, match="stream_idle_timeout_s"):
        Workload(name="w", isl=8, osl=4, sweep=sweep, stream_idle_timeout_s=0)


# -- a point through the proxy process: counted by cause, errored, then clean ------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_point_through_faults_is_errored_with_causes_then_the_next_is_clean(tok_dir):
    wl = Workload(name="faults", isl=32, osl=8, request_timeout_s=30, stream_idle_timeout_s=2.0,
                  sweep=Sweep(kind="concurrency", points=[2], requests_per_point=12, warmup_requests=0))

    def point(url: str, c: int):
        return run_point(base_url=url, model="stub-model", tokenizer_path=tok_dir, workload=wl, point=c,
                         topology="stub", gpus=0, processes=0)

    with StubServerProcess(StubBehavior(token_interval_s=0.005)) as upstream:
        proxy = SlowdownProxyProcess(upstream, 0.0, faults=FaultPlan(status=503, status_first=3))
        with proxy as url:
            five = point(url, 2)
            proxy.set_faults(FaultPlan(status=429, status_first=2, stall_after_events=2, stall_every=3))
            mixed = point(url, 2)
            counts = proxy.fault_counts()
            proxy.set_faults(FaultPlan())
            clean = point(url, 2)
    th = load_thresholds()
    assert five.summary.errors == {"http_5xx": 3} and five.summary.requests_failed == 3
    v = judge(five, test_id="t", baselines_root=tok_dir, thresholds=th, gate=False)
    assert v.errored and (v.failure_message() or "").startswith(
        "errored, no performance verdict: 3 of 12 requests failed (error budget 0): 3 http_5xx (HTTP 503: ")
    # 2 answered 429, then of the other 10 requests (index 2..11) those at index % 3 == 0 stall: 3, 6, 9
    assert counts == FaultCounts(requests=12, answered_status=2, stalled=3)
    assert mixed.summary.errors == {"timeout": 3, "http_4xx": 2}
    msg = judge(mixed, test_id="t", baselines_root=tok_dir, thresholds=th, gate=False).failure_message() or ""
    assert msg.startswith("errored, no performance verdict: 5 of 12 requests failed (error budget 0): "
                          "3 timeout (stream stalled: no token for 2 s after 2 tokens"), msg
    assert "2 http_4xx (HTTP 429: " in msg
    assert clean.summary.requests_failed == 0 and not judge(clean, test_id="t", baselines_root=tok_dir,
                                                             thresholds=th, gate=False).errored


# -- a replica restart that shows only after the point it failed -------------------------------------

class Counter:
    """A restart counter that moves on its ``moves_at``-th reading (None: never)."""

    def __init__(self, moves_at: int | None) -> None:
        self.reads = 0
        self.moves_at = moves_at

    def __call__(self) -> int:
        self.reads += 1
        return 5 + (1 if self.moves_at is not None and self.reads >= self.moves_at else 0)


def test_restart_after_a_failed_point_is_still_its_own():
    from pdperf.gate.point import restarts_during_point

    c = Counter(moves_at=3)  # read at the end (no restart yet), then the health check replaces the replica
    assert restarts_during_point(c, 5, failed=24, settle_s=5, interval_s=0.01) == 1 and c.reads == 3


def test_restart_wait_only_after_failures_and_bounded():
    from pdperf.gate.point import restarts_during_point

    quiet = Counter(moves_at=2)
    assert restarts_during_point(quiet, 5, failed=0, settle_s=5, interval_s=0.01) == 0 and quiet.reads == 1
    seen = Counter(moves_at=1)
    assert restarts_during_point(seen, 5, failed=3, settle_s=5, interval_s=0.01) == 1 and seen.reads == 1
    t0 = time.monotonic()
    assert restarts_during_point(Counter(None), 5, failed=3, settle_s=0.2, interval_s=0.02) == 0
    assert time.monotonic() - t0 < 2
    assert restarts_during_point(Counter(moves_at=2), 5, failed=3, settle_s=0) == 0  # other backends: no wait
