"""The PD proxy of the no-Ray reference path: the prefill request it builds, and its HTTP flow.

The HTTP tests put the proxy between two small aiohttp *stubs* on loopback (ports chosen by
the OS): a prefill stub that answers with ``kv_transfer_params`` and a decode stub that checks
it received them and streams SSE back. The stubs test the proxy's plumbing, not serving.
"""

from __future__ import annotations

import asyncio
import copy
import json
from contextlib import asynccontextmanager

import pytest
from aiohttp import ClientSession, ClientTimeout, web

from pdperf.backends.pd_proxy import make_app, prefill_request
from pdperf.waiting import free_port

pytestmark = pytest.mark.selftest

TEST_TIMEOUT_S = 15.0

REQUEST = {"model": "m", "prompt": "def f():", "max_tokens": 16, "min_tokens": 16, "stream": True,
           "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "temperature": 0.0,
           "ignore_eos": True}

KV_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "stub-prefill-engine",
             "remote_block_ids": [3, 4, 5], "remote_host": "127.0.0.1", "remote_port": 5600}

SSE_EVENTS = [{"choices": [{"index": 0, "text": f" tok{i}"}]} for i in range(3)]


def test_prefill_request_asks_for_one_token_and_remote_decode():
    req = prefill_request(dict(REQUEST, max_completion_tokens=16))
    assert req["max_tokens"] == 1 and req["max_completion_tokens"] == 1
    assert req["stream"] is False
    assert req["kv_transfer_params"]["do_remote_decode"] is True
    assert req["kv_transfer_params"]["do_remote_prefill"] is False
    assert "min_tokens" not in req and "stream_options" not in req
    assert {k: req[k] for k in ("model", "prompt", "temperature", "ignore_eos")} == {
        "model": "m", "prompt": "def f():", "temperature": 0.0, "ignore_eos": True}


def test_prefill_request_leaves_the_original_alone():
    original = copy.deepcopy(REQUEST)
    prefill_request(REQUEST)
    assert REQUEST == original


def test_prefill_request_without_optional_fields():
    req = prefill_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert req["max_tokens"] == 1 and req["stream"] is False
    assert "max_completion_tokens" not in req


# -- HTTP flow through the proxy ---------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": "m"}]})


class PrefillStub:
    """Stub of a prefill engine: records each request, answers one token and kv_transfer_params."""

    def __init__(self, status: int = 200):
        self.status = status
        self.received: list[dict] = []

    def app(self) -> web.Application:
        async def completions(request: web.Request) -> web.Response:
            self.received.append(await request.json())
            if self.status != 200:
                return web.json_response({"error": "stub prefill: injected failure"}, status=self.status)
            return web.json_response({"id": "cmpl-stub", "choices": [{"index": 0, "text": " tok0"}],
                                      "kv_transfer_params": KV_PARAMS})

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/health", health)
        return app


class DecodeStub:
    """Stub of a decode engine: checks the kv_transfer_params it got, then streams SSE events."""

    def __init__(self, expect_kv: dict | None):
        self.expect_kv = expect_kv
        self.received: list[dict] = []

    def app(self) -> web.Application:
        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.received.append(body)
            if body.get("kv_transfer_params") != self.expect_kv:
                return web.json_response({"error": f"stub decode: kv_transfer_params {body.get('kv_transfer_params')!r}, "
                                                   f"expected {self.expect_kv!r}"}, status=400)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for event in SSE_EVENTS:
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/health", health)
        return app


@asynccontextmanager
async def serving(app: web.Application):
    """Serve an app on a loopback port the OS picks; yield its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxy_between(prefill: list[str], decode: list[str]):
    async with serving(make_app(prefill, decode)) as url:
        async with ClientSession(timeout=ClientTimeout(total=10)) as client:
            yield url, client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_proxy_prefills_then_streams_decode(path):
    prefill_stub, decode_stub = PrefillStub(), DecodeStub(expect_kv=KV_PARAMS)

    async def scenario():
        async with serving(prefill_stub.app()) as p_url, serving(decode_stub.app()) as d_url:
            async with proxy_between([p_url], [d_url]) as (proxy, client):
                async with client.post(proxy + path, json=REQUEST) as resp:
                    return resp.status, resp.headers.get("Content-Type"), await resp.text()

    status, content_type, text = run(scenario())
    assert status == 200, text
    assert content_type.startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert [json.loads(e) for e in events[:-1]] == SSE_EVENTS

    [to_prefill] = prefill_stub.received
    assert to_prefill["max_tokens"] == 1 and to_prefill["stream"] is False
    assert to_prefill["kv_transfer_params"]["do_remote_decode"] is True
    [to_decode] = decode_stub.received
    assert to_decode == dict(REQUEST, kv_transfer_params=KV_PARAMS)  # the original request, plus the KV handle


def test_prefill_failure_is_returned_and_decode_is_not_called():
    prefill_stub, decode_stub = PrefillStub(status=503), DecodeStub(expect_kv=KV_PARAMS)

    async def scenario():
        async with serving(prefill_stub.app()) as p_url, serving(decode_stub.app()) as d_url:
            async with proxy_between([p_url], [d_url]) as (proxy, client):
                async with client.post(proxy + "/v1/completions", json=REQUEST) as resp:
                    return resp.status, await resp.text()

    status, text = run(scenario())
    assert status == 503 and "injected failure" in text
    assert len(prefill_stub.received) == 1 and decode_stub.received == []


def test_without_prefill_engines_it_round_robins_decode_engines():
    stubs = [DecodeStub(expect_kv=None), DecodeStub(expect_kv=None)]

    async def scenario():
        async with serving(stubs[0].app()) as d0, serving(stubs[1].app()) as d1:
            async with proxy_between([], [d0, d1]) as (proxy, client):
                statuses = []
                for _ in range(4):
                    async with client.post(proxy + "/v1/completions", json=REQUEST) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                async with client.get(proxy + "/v1/models") as resp:
                    listed = await resp.json()
                return statuses, listed

    statuses, listed = run(scenario())
    assert statuses == [200] * 4
    assert [len(s.received) for s in stubs] == [2, 2]
    assert all("kv_transfer_params" not in body for s in stubs for body in s.received)
    assert listed == {"data": [{"id": "m"}]}


def test_health_names_the_engine_that_does_not_answer():
    decode_stub = DecodeStub(expect_kv=None)
    nothing_there = f"http://127.0.0.1:{free_port()}"

    async def scenario():
        async with serving(decode_stub.app()) as d_url:
            async with proxy_between([], [d_url]) as (proxy, client):
                async with client.get(proxy + "/health") as resp:
                    healthy = (resp.status, await resp.text())
            async with proxy_between([nothing_there], [d_url]) as (proxy, client):
                async with client.get(proxy + "/health") as resp:
                    broken = (resp.status, await resp.text())
        return healthy, broken

    healthy, broken = run(scenario())
    assert healthy == (200, "ok")
    assert broken[0] == 503 and nothing_there in broken[1]
