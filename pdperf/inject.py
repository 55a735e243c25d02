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
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from pdperf.backends.base import Deployment, Endpoint
from pdperf.gate.store import INJECTED_FLAG
from pdperf.loadgen.stub_server import StubServerProcess, announce_until_signalled, serve_app

DELAYED = ("/v1/completions", "/v1/chat/completions")
HEALTH_PATH = "/pdperf-inject/health"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class SlowdownProxy:
    """The proxy on the running event loop: ``async with SlowdownProxy(upstream, 0.2) as p: p.url``."""

    def __init__(self, upstream: str, slowdown: float, *, host: str = "127.0.0.1") -> None:
        if slowdown < 0:
            raise ValueError(f"slowdown {slowdown}: must be >= 0 (0.2 = 20% slower)")
        self.upstream = upstream.rstrip("/")
        self.slowdown = slowdown
        self.host = host
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SlowdownProxy:
        # As many connections as the client opens: the proxy must not become the queue.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get(HEALTH_PATH, self._health)  # its own: the upstream's health path varies
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner, self.url = await serve_app(app, self.host)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        t0 = time.monotonic()
        delayed = request.path in DELAYED and self.slowdown > 0
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


class SlowdownProxyProcess(StubServerProcess):
    """The proxy in its own process: ``with SlowdownProxyProcess(upstream, 0.2) as url``; the
    stub server's start-up (announced URL, then the proxy's own health path) and process-group exit."""

    health_path = HEALTH_PATH

    def __init__(self, upstream: str, slowdown: float, *, python: str = sys.executable,
                 startup_timeout_s: float = 60.0, cpu: int | None = None) -> None:
        super().__init__(python=python, startup_timeout_s=startup_timeout_s, cpu=cpu)
        self.upstream = upstream
        self.slowdown = slowdown

    def command(self) -> list[str]:
        return [self.python, "-m", "pdperf.inject", "--upstream", self.upstream, "--slowdown", repr(self.slowdown)]


async def _serve_forever(upstream: str, slowdown: float) -> None:
    await announce_until_signalled(SlowdownProxy(upstream, slowdown))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdperf.inject",
                                 description="A proxy that makes a real OpenAI server's responses SLOWDOWN slower "
                                             "(time dilation of every byte): known regressions for the gate.")
    ap.add_argument("--upstream", required=True, help="the real server's base URL")
    ap.add_argument("--slowdown", type=float, required=True, help="0.2 = every response 20%% slower")
    args = ap.parse_args(argv)
    if args.slowdown < 0:
        ap.error(f"--slowdown {args.slowdown}: must be >= 0 (0.2 = 20% slower)")
    try:  # the proxy's own cost adds to every injected slowdown: the faster loop where there is one
        import uvloop

        uvloop.run(_serve_forever(args.upstream, args.slowdown))
    except ImportError:
        asyncio.run(_serve_forever(args.upstream, args.slowdown))
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
