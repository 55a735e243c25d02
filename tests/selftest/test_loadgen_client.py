"""The client against the loopback stub: error classification, load models, queueing.

The stub (pdperf.loadgen.stub_server) injects the failures a real engine cannot produce on
demand. Assertions are on classification and ordering, never on speed.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from pdperf import metrics
from pdperf.loadgen.client import (
    PreparedRequest,
    StreamingClient,
    arrival_offsets_s,
    build_body,
    run_closed_loop,
    run_open_loop,
)
from pdperf.loadgen.stub_server import StubBehavior, StubOpenAIServer

pytestmark = pytest.mark.selftest


def reqs(n: int, max_tokens: int = 4, api: str = "completions") -> list[PreparedRequest]:
    body = build_body(model="stub-model", prompt="one two three", max_tokens=max_tokens, api=api)  # type: ignore[arg-type]
    return [PreparedRequest(index=i, body=body, input_tokens=3, output_tokens=max_tokens) for i in range(n)]


async def send_one(behavior: StubBehavior, *, timeout_s: float = 5.0, api: str = "completions", max_tokens: int = 4):
    async with StubOpenAIServer(behavior) as stub:
        async with StreamingClient(stub.url, api=api, timeout_s=timeout_s, keep_text=True) as client:  # type: ignore[arg-type]
            rec = await client.send(reqs(1, max_tokens, api)[0], time.perf_counter())
            return rec, client


def per_chunk_reqs(n: int, max_tokens: int = 4, api: str = "completions") -> list[PreparedRequest]:
    body = build_body(model="stub-model", prompt="one two three", max_tokens=max_tokens, api=api,  # type: ignore[arg-type]
                      per_chunk_usage=True)
    return [PreparedRequest(index=i, body=body, input_tokens=3, output_tokens=max_tokens) for i in range(n)]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_ok_request_counts_tokens_from_per_chunk_usage(api):
    async def go():
        async with StubOpenAIServer(StubBehavior(tokens_per_chunk=3)) as stub:
            async with StreamingClient(stub.url, api=api, timeout_s=5.0, keep_text=True) as client:  # type: ignore[arg-type]
                return await client.send(per_chunk_reqs(1, 7, api)[0], time.perf_counter()), client
    rec, client = asyncio.run(go())
    assert rec.ok, rec.error_detail
    assert rec.output_tokens == 7 and rec.chunk_tokens == [3, 3, 1]
    assert rec.input_tokens == 3
    assert rec.scheduled_s <= rec.sent_s <= rec.first_token_s <= rec.end_s
    assert client.stats.accounting == {"continuous_usage": 1}
    assert client.stats.output_length_mismatch == 0 and client.stats.input_length_mismatch == 0
    assert client.last_text[0] == " tok" * 7


@pytest.mark.parametrize("usage,accounting", [("final", "final_usage"), ("none", "chunk_count")])
def test_servers_without_continuous_usage(usage, accounting):
    rec, client = asyncio.run(send_one(StubBehavior(tokens_per_chunk=3, usage=usage), max_tokens=7))
    assert rec.ok and len(rec.chunk_tokens) == 3 and rec.chunk_tokens[0] == 1
    # final usage: 7 tokens in 3 chunks, the extra ones by the chunks' waits; no usage: one a chunk (a guess)
    assert sum(rec.chunk_tokens) == (7 if usage == "final" else 3)
    assert client.stats.accounting == {accounting: 1}


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_default_request_counts_one_token_per_chunk_exactly(api):
    """The default body asks for the final usage only; one token a chunk is checked against it."""
    rec, client = asyncio.run(send_one(StubBehavior(tokens_per_chunk=1), api=api, max_tokens=7))
    assert rec.ok and rec.output_tokens == 7 and rec.chunk_tokens == [1] * 7
    assert client.stats.accounting == {"final_usage_exact": 1}


@pytest.mark.parametrize("failure,kind,detail", [
    ("http_500", "http_5xx", "HTTP 500: stub: injected HTTP 500"),
    ("http_400", "http_4xx", "HTTP 400"),
    ("error_mid_stream", "stream", "error event mid-stream"),
    ("bad_json", "stream", "bad JSON"),
    ("no_done", "stream", "without [DONE]"),
    ("drop_connection", "stream", "connection dropped mid-stream"),
    ("empty", "empty", "no token"),
])
def test_failures_are_classified(failure, kind, detail):
    rec, _ = asyncio.run(send_one(StubBehavior(failure=failure, fail_after_tokens=2)))
    assert not rec.ok
    assert rec.error == kind
    assert detail in rec.error_detail
    if kind == "stream" and failure != "empty":
        assert rec.first_token_s is not None and rec.output_tokens == 2


def test_request_that_never_gets_a_first_token_times_out():
    rec, _ = asyncio.run(send_one(StubBehavior(failure="no_first_token"), timeout_s=0.3))
    assert rec.error == "timeout" and rec.first_token_s is None
    assert "no first token" in rec.error_detail


def test_connection_refused_is_a_connection_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    async def go():
        async with StreamingClient(f"http://127.0.0.1:{port}", timeout_s=5) as client:
            return await client.send(reqs(1)[0], time.perf_counter())

    rec = asyncio.run(go())
    assert rec.error == "connection" and rec.first_token_s is None


def test_output_length_mismatch_is_counted():
    async def go():
        async with StubOpenAIServer(StubBehavior()) as stub:
            async with StreamingClient(stub.url) as client:
                r = PreparedRequest(index=0, body=build_body(model="m", prompt="a", max_tokens=4), input_tokens=9,
                                    output_tokens=5)  # the server will send 4, and count 1 prompt token
                await client.send(r, time.perf_counter())
                return client.stats

    stats = asyncio.run(go())
    assert stats.output_length_mismatch == 1 and stats.input_length_mismatch == 1


def _max_in_flight(records) -> int:
    events = sorted([(r.sent_s, 1) for r in records] + [(r.end_s, -1) for r in records], key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_closed_loop_keeps_concurrency_and_schedules_when_a_slot_frees():
    async def go():
        async with StubOpenAIServer(StubBehavior(ttft_s=0.01, token_interval_s=0.002)) as stub:
            async with StreamingClient(stub.url) as client:
                t0 = time.perf_counter() + 0.01
                return t0, await run_closed_loop(client, reqs(12), concurrency=3, t0_s=t0, worker=2)

    t0, recs = asyncio.run(go())
    assert len(recs) == 12 and all(r.ok for r in recs)
    assert sum(1 for r in recs if r.scheduled_s == t0) == 3  # each slot's first request starts at t0
    assert _max_in_flight(recs) <= 3
    assert all(r.worker == 2 for r in recs)
    later = [r for r in recs if r.scheduled_s > t0]
    ends = sorted(r.end_s for r in recs)
    for r in later:  # scheduled right after some request of its slot ended
        assert any(0 <= r.scheduled_s - e < 0.05 for e in ends)


def test_closed_loop_stops_scheduling_at_the_duration_bound():
    async def go():
        async with StubOpenAIServer(StubBehavior(ttft_s=0.02)) as stub:
            async with StreamingClient(stub.url) as client:
                t0 = time.perf_counter() + 0.01
                return t0, await run_closed_loop(client, reqs(1000), concurrency=2, t0_s=t0, stop_at_s=t0 + 0.1)

    t0, recs = asyncio.run(go())
    assert 2 <= len(recs) < 1000
    assert all(r.scheduled_s < t0 + 0.1 for r in recs)


def test_open_loop_with_cap_one_shows_queueing():
    async def go():
        async with StubOpenAIServer(StubBehavior(ttft_s=0.02, token_interval_s=0.005)) as stub:
            async with StreamingClient(stub.url) as client:
                t0 = time.perf_counter() + 0.01
                offsets = [0.0, 0.001, 0.002, 0.003]  # arrivals far faster than one request lasts
                return t0, offsets, await run_open_loop(client, reqs(4), offsets, t0_s=t0, max_concurrency=1)

    t0, offsets, recs = asyncio.run(go())
    assert all(r.ok for r in recs)
    assert [r.scheduled_s - t0 for r in recs] == pytest.approx(offsets)  # the clock starts at arrival
    q = sorted(metrics.queue_ms(r) for r in recs)
    assert q[-1] > 0 and q[1] > 0  # the later arrivals waited behind the cap...
    ttft = metrics.ttft_ms(recs[-1])
    assert ttft >= q[-1]  # ...and the wait is inside their TTFT
    assert _max_in_flight(recs) == 1


def test_open_loop_without_cap_sends_on_arrival():
    async def go():
        async with StubOpenAIServer(StubBehavior(ttft_s=0.05)) as stub:
            async with StreamingClient(stub.url) as client:
                t0 = time.perf_counter() + 0.01
                return await run_open_loop(client, reqs(5), [0.0] * 5, t0_s=t0)

    recs = asyncio.run(go())
    assert _max_in_flight(recs) == 5


# -- arrivals -----------------------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_with_the_right_mean_rate():
    a = arrival_offsets_s(20001, 50.0, seed=7)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, arrival_offsets_s(20001, 50.0, seed=7))
    assert not np.array_equal(a, arrival_offsets_s(20001, 50.0, seed=8))
    gaps = np.diff(a)
    assert 20000 / a[-1] == pytest.approx(50.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness(burstiness):
    a = arrival_offsets_s(20001, 10.0, burstiness=burstiness, seed=3)
    gaps = np.diff(a)
    assert 20000 / a[-1] == pytest.approx(10.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)  # gamma CV


def test_arrival_arguments_are_checked():
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets_s(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets_s(3, 1.0, burstiness=0)
