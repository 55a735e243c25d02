"""A small PD proxy for plain ``vllm serve`` engines: the no-Ray reference path.

For each request it asks a prefill engine for one token with
``kv_transfer_params.do_remote_decode`` set (the engine computes the KV cache and keeps it
for pickup), then sends the original request with the returned ``kv_transfer_params`` to a
decode engine, which pulls the KV over NIXL and streams the answer back through the proxy.
This is the flow of vLLM's own disaggregated-serving example proxy; engines are picked
round-robin. With no prefill engines it is a plain round-robin proxy (collocated replicas).

Run: ``python -m pdperf.backends.pd_proxy --port P --decode URL[,URL] [--prefill URL[,URL]]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def prefill_request(body: dict) -> dict:
    req = dict(body)
    req.update({"max_tokens": 1, "stream": False,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                       "remote_block_ids": None, "remote_host": None, "remote_port": None}})
    if "max_completion_tokens" in req:
        req["max_completion_tokens"] = 1
    req.pop("stream_options", None)
    req.pop("min_tokens", None)
    return req


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str]):
        self.prefill = prefill
        self.decode = decode
        self._p = itertools.cycle(prefill) if prefill else None
        self._d = itertools.cycle(decode)
        self.session: ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None))

    async def stop(self, app: web.Application) -> None:
        if self.session:
            await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.json()
        path = request.path
        if self._p is not None:
            async with self.session.post(next(self._p) + path, json=prefill_request(body)) as resp:
                if resp.status != 200:
                    return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")
                kv = (await resp.json()).get("kv_transfer_params")
            body = dict(body, kv_transfer_params=kv)
        async with self.session.post(next(self._d) + path, json=body) as resp:
            out = web.StreamResponse(status=resp.status, headers={k: v for k, v in resp.headers.items()
                                                                  if k.lower() not in HOP_HEADERS})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        async with self.session.get(self.decode[0] + "/v1/models") as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        assert self.session is not None
        for url in self.prefill + self.decode:
            try:
                async with self.session.get(url + "/health", timeout=ClientTimeout(total=5)) as resp:
                    if resp.status != 200:
                        return web.Response(status=503, text=f"{url} answered {resp.status}")
            except (OSError, asyncio.TimeoutError) as e:
                return web.Response(status=503, text=f"{url}: {e}")
        return web.Response(text="ok")


def make_app(prefill: list[str], decode: list[str]) -> web.Application:
    proxy = Proxy(prefill, decode)
    app = web.Application(client_max_size=64 * 2**20)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_post("/v1/completions", proxy.forward)
    app.router.add_post("/v1/chat/completions", proxy.forward)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdperf.backends.pd_proxy")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefill", default="", help="comma-separated prefill engine base URLs")
    ap.add_argument("--decode", required=True, help="comma-separated decode (or collocated) engine base URLs")
    args = ap.parse_args(argv)
    split = lambda s: [u.rstrip("/") for u in s.split(",") if u]  # noqa: E731
    print(json.dumps({"proxy": f"http://{args.host}:{args.port}", "prefill": split(args.prefill),
                      "decode": split(args.decode)}), flush=True)
    web.run_app(make_app(split(args.prefill), split(args.decode)), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
