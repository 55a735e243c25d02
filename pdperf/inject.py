"""A real server made slower by a known factor: what the baseline gate must detect.

To say what regression the gate catches, and how often it cries wolf, the suite needs
regressions of known size on the real stack. Slowing the engine itself by a known amount is
not possible (a smaller batch or a busier core changes it by an unknown amount), so this
proxy stands between the client and the real server and dilates time: every byte of a
response reaches the client at ``t0 + (t - t0) * (1 + slowdown)``, where ``t0`` is when the
request arrived and ``t`` when the byte came from the server. TTFT, every inter-token gap and
E2E grow by exactly ``slowdown``; under a closed loop the next request then starts later, as it
would against a slower server. The server's own metrics do not see it, which is how the report
tells an injected point from a real one (and every injected point is flagged
``injected_slowdown:<f>``, so it is never written as a baseline).

The proxy runs in a process of its own (``SlowdownProxyProcess``; ``python -m pdperf.inject``),
binds 127.0.0.1 on a free port, and passes everything else (/health, /v1/models, /metrics,
/reset_prefix_cache) through undelayed. ``slowdown=0`` measures the proxy's own cost.

The same proxy puts *faults* of known shape in front of the real server (a :class:`FaultPlan`,
set at start or at run time through ``POST /pdperf-inject/faults``): a stream that stops after
N events and holds its connection open (a stuck engine or a lost KV transfer, as the client sees
it), and HTTP 503 / 429 answers for the first K completion requests or for a window of time
(an overloaded or rate-limiting gateway). A real engine fails neither on demand nor in a
chosen way; the loopback stub does, but only the real stack shows that the suite's client,
runner and verdict name these faults right with a real server's timing around them
(tests/faults/test_faults.py). Points measured through the proxy carry the injected flag
too, so they are never baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from pdperf.backends.base import Deployment, Endpoint
from pdperf.gate.store import INJECTED_FLAG
from pdperf.loadgen.stub_server import StubServerProcess, announce_until_signalled, serve_app

DELAYED = ("/v1/completions", "/v1/chat/completions")
HEALTH_PATH = "/pdperf-inject/health"
FAULTS_PATH = "/pdperf-inject/faults"
FAULT_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class FaultPlan:
    """Faults the proxy puts into completion requests, counted from the plan's first request.

    ``status`` answers the first ``status_first`` requests, or every request that arrives within
    ``status_for_s`` seconds of the first, with that HTTP status (an OpenAI-style error body; 429 with a
    ``Retry-After``), without asking the server. ``stall_after_events`` forwards that many SSE
    events of a stream (whole events, so the client parses each) and then nothing more, holding
    the connection open until the client gives up; every ``stall_every``-th request stalls
    (1: all). The server's own stream is still read to its end, so the engine is not held.
    The default plan injects nothing.
    """

    status: int | None = None
    status_first: int | None = None
    status_for_s: float | None = None
    stall_after_events: int | None = None
    stall_every: int = 1

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in FAULT_STATUSES:
            raise ValueError(f"fault status {self.status}: use one of {FAULT_STATUSES}")
        if self.status is not None and self.status_first is None and self.status_for_s is None:
            raise ValueError(f"fault status {self.status}: say for which requests, status_first K or status_for_s S")
        if self.status is None and (self.status_first is not None or self.status_for_s is not None):
            raise ValueError("status_first / status_for_s without a status: set status (e.g. 503 or 429)")
        if self.status_first is not None and self.status_first < 1:
            raise ValueError(f"status_first {self.status_first}: must be >= 1")
        if self.status_for_s is not None and not self.status_for_s > 0:
            raise ValueError(f"status_for_s {self.status_for_s}: must be > 0 seconds")
        if self.stall_after_events is not None and self.stall_after_events < 0:
            raise ValueError(f"stall_after_events {self.stall_after_events}: must be >= 0")
        if self.stall_every < 1:
            raise ValueError(f"stall_every {self.stall_every}: must be >= 1 (1: every request stalls)")

    @property
    def active(self) -> bool:
        return self.status is not None or self.stall_after_events is not None

    def decide(self, index: int, since_first_s: float) -> tuple[int | None, int | None]:
        """For the ``index``-th completion request under this plan, arriving ``since_first_s`` after its first
        (the window starts with the load, not when the plan was set: a point builds its prompts first):
        (HTTP status to answer instead of forwarding, or None; events after which its stream stalls, or None)."""
        if self.status is not None and ((self.status_first is not None and index < self.status_first)
                                        or (self.status_for_s is not None and since_first_s < self.status_for_s)):
            return self.status, None
        if self.stall_after_events is not None and index % self.stall_every == 0:
            return None, self.stall_after_events
        return None, None

    @classmethod
    def from_json(cls, text: str | bytes) -> FaultPlan:
        data = json.loads(text or "{}")
        if not isinstance(data, dict):
            raise ValueError(f"fault plan: expected a JSON object, got {text!r:.100}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"fault plan: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class FaultCounts:
    """What the proxy did under the current plan (``GET /pdperf-inject/faults``)."""

    requests: int = 0  # completion requests seen since the plan was set
    answered_status: int = 0  # answered with the plan's status instead of forwarded
    stalled: int = 0  # streams held open after stall_after_events events


def sse_events_end(buf: bytes, events: int) -> tuple[int, int]:
    """Where the first ``events`` whole SSE events of ``buf`` end: (bytes, events found), at most ``events``."""
    end = found = 0
    while found < events:
        i = buf.find(b"\n\n", end)
        if i < 0:
            break
        end, found = i + 2, found + 1
    return end, found
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class SlowdownProxy:
    """The proxy on the running event loop: ``async with SlowdownProxy(upstream, 0.2) as p: p.url``."""

    def __init__(self, upstream: str, slowdown: float, *, host: str = "127.0.0.1",
                 faults: FaultPlan | None = None) -> None:
        if slowdown < 0:
            raise ValueError(f"slowdown {slowdown}: must be >= 0 (0.2 = 20% slower)")
        self.upstream = upstream.rstrip("/")
        self.slowdown = slowdown
        self.host = host
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Event | None = None  # releases held (stalled) streams at exit
        self.set_faults(faults or FaultPlan())

    def set_faults(self, plan: FaultPlan) -> None:
        """A new plan; its request count starts again, its clock at its first request."""
        self.faults = plan
        self.fault_counts = FaultCounts()
        self._first_request_s: float | None = None

    async def __aenter__(self) -> SlowdownProxy:
        # As many connections as the client opens: the proxy must not become the queue.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get(HEALTH_PATH, self._health)  # its own: the upstream's health path varies
        app.router.add_get(FAULTS_PATH, self._get_faults)
        app.router.add_post(FAULTS_PATH, self._post_faults)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner, self.url = await serve_app(app, self.host)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _faults_json(self) -> web.Response:
        return web.json_response({"plan": dataclasses.asdict(self.faults), "counts": dataclasses.asdict(self.fault_counts)})

    async def _get_faults(self, request: web.Request) -> web.Response:
        return self._faults_json()

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            plan = FaultPlan.from_json(await request.read())
        except (ValueError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        self.set_faults(plan)
        return self._faults_json()

    def _fault_answer(self, status: int) -> web.Response:
        """What an overloaded or rate-limiting OpenAI server answers (vLLM's error body shape)."""
        name = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
                503: "Service Unavailable", 504: "Gateway Timeout"}[status]
        body = {"error": {"message": f"pdperf.inject: injected HTTP {status} ({name}) by the fault plan",
                          "type": name.replace(" ", ""), "code": status}}
        return web.json_response(body, status=status, headers={"Retry-After": "1"} if status == 429 else None)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        t0 = time.monotonic()
        delayed = request.path in DELAYED and self.slowdown > 0
        stall_after: int | None = None
        if request.path in DELAYED and self.faults.active:
            counts = self.fault_counts
            if self._first_request_s is None:
                self._first_request_s = t0
            status, stall_after = self.faults.decide(counts.requests, t0 - self._first_request_s)
            counts.requests += 1
            if status is not None:
                counts.answered_status += 1
                return self._fault_answer(status)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_HEADERS:
                    resp.headers[k] = v
            # A reader stamps each chunk when it comes; the writer holds it until it is due. Reading
            # and writing in one loop would stamp a chunk when the writer got to it, not when the
            # server sent it, and the delays would compound.
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

            async def read() -> None:
                try:
                    async for chunk in up.content.iter_any():
                        queue.put_nowait((time.monotonic(), chunk))
                finally:
                    queue.put_nowait(None)

            reader = asyncio.create_task(read())
            try:
                await resp.prepare(request)
                if stall_after is not None:
                    await self._stall(resp, queue, stall_after)
                    await reader
                    return resp
                while (item := await queue.get()) is not None:
                    t, chunk = item
                    if delayed:
                        wait = t + (t - t0) * self.slowdown - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    await resp.write(chunk)
                await reader  # an upstream error surfaces here: the client's stream is cut, as by the server
            finally:
                reader.cancel()
            await resp.write_eof()
            return resp

    async def _stall(self, resp: web.StreamResponse, queue: asyncio.Queue[tuple[float, bytes] | None],
                     events: int) -> None:
        """Forward the stream's first ``events`` SSE events, then hold the connection open without a byte
        more until the client disconnects (aiohttp cancels this handler) or the proxy closes. The server's
        stream is drained meanwhile: only the client sees the stall."""
        assert self._closing is not None
        buf = b""
        sent = 0
        while sent < events and (item := await queue.get()) is not None:
            buf += item[1]
            end, found = sse_events_end(buf, events - sent)
            if end:
                await resp.write(buf[:end])
                buf, sent = buf[end:], sent + found
        self.fault_counts.stalled += 1

        async def drain() -> None:
            while await queue.get() is not None:
                pass

        drainer = asyncio.create_task(drain())
        try:
            await self._closing.wait()
        finally:
            drainer.cancel()


class SlowdownProxyProcess(StubServerProcess):
    """The proxy in its own process: ``with SlowdownProxyProcess(upstream, 0.2) as url``; the
    stub server's start-up (announced URL, then the proxy's own health path) and process-group exit."""

    health_path = HEALTH_PATH

    def __init__(self, upstream: str, slowdown: float, *, python: str = sys.executable,
                 startup_timeout_s: float = 60.0, cpu: int | None = None, faults: FaultPlan | None = None) -> None:
        super().__init__(python=python, startup_timeout_s=startup_timeout_s, cpu=cpu)
        self.upstream = upstream
        self.slowdown = slowdown
        self.faults = faults

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "pdperf.inject", "--upstream", self.upstream, "--slowdown", repr(self.slowdown)]
        if self.faults is not None:
            cmd += ["--faults", json.dumps(dataclasses.asdict(self.faults))]
        return cmd

    def set_faults(self, plan: FaultPlan) -> FaultCounts:
        """Replace the running proxy's fault plan (``FaultPlan()``: none); its counts start again."""
        return self._faults_call(urllib.request.Request(self.url + FAULTS_PATH, method="POST",
                                                        data=json.dumps(dataclasses.asdict(plan)).encode()))

    def fault_counts(self) -> FaultCounts:
        """What the proxy did under its current plan."""
        return self._faults_call(urllib.request.Request(self.url + FAULTS_PATH))

    def _faults_call(self, req: urllib.request.Request) -> FaultCounts:
        with urllib.request.urlopen(req, timeout=10) as r:
            return FaultCounts(**json.loads(r.read())["counts"])


async def _serve_forever(upstream: str, slowdown: float, faults: FaultPlan | None) -> None:
    await announce_until_signalled(SlowdownProxy(upstream, slowdown, faults=faults))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdperf.inject",
                                 description="A proxy that makes a real OpenAI server's responses SLOWDOWN slower "
                                             "(time dilation of every byte): known regressions for the gate.")
    ap.add_argument("--upstream", required=True, help="the real server's base URL")
    ap.add_argument("--slowdown", type=float, required=True, help="0.2 = every response 20%% slower")
    ap.add_argument("--faults", default=None,
                    help='a FaultPlan as JSON, e.g. \'{"status": 503, "status_first": 4}\' or '
                         '\'{"stall_after_events": 3, "stall_every": 2}\'; changed at run time by POST ' + FAULTS_PATH)
    args = ap.parse_args(argv)
    if args.slowdown < 0:
        ap.error(f"--slowdown {args.slowdown}: must be >= 0 (0.2 = 20% slower)")
    faults = None
    if args.faults is not None:
        try:
            faults = FaultPlan.from_json(args.faults)
        except (ValueError, TypeError) as e:
            ap.error(f"--faults: {e}")
    try:  # the proxy's own cost adds to every injected slowdown: the faster loop where there is one
        import uvloop

        uvloop.run(_serve_forever(args.upstream, args.slowdown, faults))
    except ImportError:
        asyncio.run(_serve_forever(args.upstream, args.slowdown, faults))
    return 0


if __name__ == "__main__":
    sys.exit(main())


class SlowedDeployment(Deployment):
    """A backend's deployment, served to the suite through the slowdown proxy: every endpoint the
    session hands out (smoke, sweeps, network) is slowed alike, and says so in ``details``."""

    def __init__(self, inner: Deployment, slowdown: float) -> None:
        self.inner = inner
        self.slowdown = slowdown
        self.backend = inner.backend
        self._proxy: SlowdownProxyProcess | None = None

    def launch(self) -> None:
        self.inner.launch()

    def wait_ready(self, timeout_s: float) -> Endpoint:
        ep = self.inner.wait_ready(timeout_s)
        self._proxy = SlowdownProxyProcess(ep.base_url, self.slowdown)
        url = self._proxy.__enter__()
        return dataclasses.replace(ep, base_url=url, details={**ep.details, INJECTED_FLAG: self.slowdown})

    def stop(self, *, evict: bool = False) -> None:
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        self.inner.stop(evict=evict)

    def __getattr__(self, name: str) -> Any:  # log_tail, engine_output...: the real deployment's
        return getattr(self.inner, name)
