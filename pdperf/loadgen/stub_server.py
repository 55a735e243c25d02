"""A loopback *stub* OpenAI streaming server, for testing the load generator only.

Why it exists: fault injection (HTTP 500, an error event mid-stream, a first token that never
comes, a dropped connection, bad JSON, a stream cut before ``[DONE]``) and the client's own
ceiling cannot be tested against a real engine, which neither fails on demand nor streams
faster than the client can read. It serves nothing real: the "tokens" are a fixed word, the
prompt is not tokenised (``prompt_tokens`` is the count of whitespace-separated words unless
set), and no number measured against it says anything about serving. It never replaces a
real server in a perf test.

It binds ``127.0.0.1`` on a free port (port 0), never a fixed one. Decode steps are shared:
every stream waiting for its next token wakes on one step clock, as a continuous-batching
engine emits one token per running request per step; this also keeps the stub cheap enough
to stay out of the way when it measures the client's ceiling.

Run in-process (``async with StubOpenAIServer(StubBehavior(...)) as stub: stub.url``) or as
a separate process for benchmarks (:class:`StubServerProcess`, or
``python -m pdperf.loadgen.stub_server --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from aiohttp import web

Failure = Literal["none", "http_500", "http_400", "error_mid_stream", "no_first_token", "drop_connection",
                  "bad_json", "no_done", "empty"]
FAILURES: tuple[str, ...] = ("none", "http_500", "http_400", "error_mid_stream", "no_first_token",
                             "drop_connection", "bad_json", "no_done", "empty")


@dataclass(frozen=True)
class StubBehavior:
    """What the stub does with every request (change ``server.behavior`` between tests)."""

    ttft_s: float = 0.0  # delay from request arrival to the first token chunk
    ttft_jitter_s: float = 0.0  # TTFT drawn uniformly from ttft_s +- this (seeded): desynchronises waves
    token_interval_s: float = 0.0  # decode step; 0 streams every chunk back to back
    tokens_per_chunk: int = 1
    usage: Literal["continuous", "final", "none"] = "continuous"  # how usage is reported
    failure: Failure = "none"
    fail_after_tokens: int = 1  # mid-stream failures happen after this many tokens
    prompt_tokens: int | None = None  # None: whitespace-separated words of the prompt
    token_text: str = " tok"

    def __post_init__(self) -> None:
        if self.failure not in FAILURES:
            raise ValueError(f"stub failure '{self.failure}': unknown; use one of {FAILURES}")
        if not 0 <= self.ttft_jitter_s <= self.ttft_s:
            raise ValueError(f"stub ttft_jitter_s {self.ttft_jitter_s}: must be between 0 and ttft_s ({self.ttft_s})")
        if self.tokens_per_chunk < 1:
            raise ValueError(f"stub tokens_per_chunk {self.tokens_per_chunk}: must be >= 1")


class _StepClock:
    """One timer for all streams: ``await clock.next_step()`` resolves at the next decode step."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._fut: asyncio.Future[None] | None = None

    def next_step(self) -> asyncio.Future[None]:
        if self._fut is None or self._fut.done():
            loop = asyncio.get_running_loop()
            self._fut = loop.create_future()
            loop.call_later(self.interval_s, self._fire, self._fut)
        return self._fut

    @staticmethod
    def _fire(fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_result(None)


class StubOpenAIServer:
    """The stub server; an async context manager that serves on ``self.url`` while open."""

    def __init__(self, behavior: StubBehavior | None = None, *, host: str = "127.0.0.1", model: str = "stub-model") -> None:
        self.behavior = behavior or StubBehavior()
        self.host = host
        self.model = model
        self.url = ""
        self.stats: dict[str, Any] = {"requests": 0, "completed": 0, "tokens": 0, "active": 0,
                                      "first_request_s": None, "last_end_s": None, "bodies": 0}
        self.last_body: dict[str, Any] | None = None
        self._runner: web.AppRunner | None = None
        self._steps: dict[float, _StepClock] = {}
        self._closing: asyncio.Event | None = None
        self._rng = random.Random(0)

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> StubOpenAIServer:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stub/stats", self._stats)
        app.router.add_post("/stub/reset", self._reset)
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.url = await serve_app(app, self.host)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._closing is not None:
            self._closing.set()  # releases handlers that hold a stream open (no_first_token)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok (stub)")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "owned_by": "pdperf-stub"}]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats, "now_s": time.perf_counter(),
                                  "cpu_s": _cpu_self_s(), "behavior": asdict(self.behavior)})

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats.update(requests=0, completed=0, tokens=0, first_request_s=None, last_end_s=None)
        return web.json_response({"ok": True})

    async def _metrics(self, request: web.Request) -> web.Response:
        s = self.stats
        text = ("# HELP pdperf_stub_requests_total requests the stub answered\n"
                "# TYPE pdperf_stub_requests_total counter\n"
                f"pdperf_stub_requests_total {s['requests']}\n"
                "# TYPE vllm:generation_tokens counter\n"
                f'vllm:generation_tokens_total{{model_name="{self.model}"}} {s["tokens"]}\n')
        return web.Response(text=text, content_type="text/plain")

    def _step(self, interval_s: float) -> _StepClock:
        clock = self._steps.get(interval_s)
        if clock is None:
            clock = self._steps[interval_s] = _StepClock(interval_s)
        return clock

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        now = time.perf_counter()
        st = self.stats
        st["requests"] += 1
        if st["first_request_s"] is None:
            st["first_request_s"] = now
        b = self.behavior
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "stub: request body is not JSON", "code": 400}}, status=400)
        self.last_body = body
        chat = request.path.endswith("/chat/completions")
        if b.failure == "http_500":
            return web.Response(status=500, text="stub: injected HTTP 500 (Internal Server Error)")
        if b.failure == "http_400":
            return web.json_response({"error": {"message": "stub: injected HTTP 400", "code": 400}}, status=400)
        max_tokens = int(body.get("max_tokens") or 16)
        if b.prompt_tokens is not None:
            prompt_tokens = b.prompt_tokens
        elif chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        else:
            prompt_tokens = len(str(body.get("prompt", "")).split())
        so = body.get("stream_options") or {}
        usage_mode = b.usage if so.get("include_usage") else "none"
        if usage_mode == "continuous" and not so.get("continuous_usage_stats"):
            usage_mode = "final"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        st["active"] += 1
        try:
            await self._stream(request, resp, chat=chat, max_tokens=max_tokens, prompt_tokens=prompt_tokens,
                               usage_mode=usage_mode, b=b)
        finally:
            st["active"] -= 1
            st["last_end_s"] = time.perf_counter()
        return resp

    async def _stream(self, request: web.Request, resp: web.StreamResponse, *, chat: bool, max_tokens: int,
                      prompt_tokens: int, usage_mode: str, b: StubBehavior) -> None:
        pt = prompt_tokens
        model = json.dumps(self.model)
        if chat:
            head = (b'data: {"id":"chatcmpl-stub","object":"chat.completion.chunk","created":0,"model":%s,'
                    b'"choices":[{"index":0,"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}]'
                    % (model.encode(), b"%s"))
        else:
            head = (b'data: {"id":"cmpl-stub","object":"text_completion","created":0,"model":%s,'
                    b'"choices":[{"index":0,"text":"%s","logprobs":null,"finish_reason":null,"stop_reason":null}]'
                    % (model.encode(), b"%s"))
        tail_usage = b',"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
        if chat:
            role = (b'data: {"id":"chatcmpl-stub","object":"chat.completion.chunk","created":0,"model":%s,'
                    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                    b'"finish_reason":null}]' % model.encode())
            role += (tail_usage % (pt, 0, pt)) if usage_mode == "continuous" else b"}\n\n"
            await resp.write(role)
        if b.failure == "no_first_token":
            assert self._closing is not None
            await self._closing.wait()  # until the client disconnects (handler cancelled) or the stub closes
            return
        ttft = b.ttft_s + (self._rng.uniform(-b.ttft_jitter_s, b.ttft_jitter_s) if b.ttft_jitter_s else 0.0)
        if ttft > 0:
            await asyncio.sleep(ttft)
        if b.failure == "empty":
            await resp.write(b"data: [DONE]\n\n")
            return
        step = self._step(b.token_interval_s) if b.token_interval_s > 0 else None
        emitted = 0
        text = json.dumps(b.token_text)[1:-1].encode()
        write = resp.write
        while emitted < max_tokens:
            if emitted >= b.fail_after_tokens and b.failure in ("error_mid_stream", "drop_connection", "bad_json",
                                                                 "no_done"):
                await self._fail_mid_stream(request, resp, b.failure)
                return
            k = min(b.tokens_per_chunk, max_tokens - emitted)
            emitted += k
            chunk = head % (text * k)
            if usage_mode == "continuous":
                chunk += tail_usage % (pt, emitted, pt + emitted)
            else:
                chunk += b"}\n\n"
            await write(chunk)
            if step is not None and emitted < max_tokens:
                await step.next_step()
        self.stats["tokens"] += emitted
        self.stats["completed"] += 1
        if usage_mode in ("continuous", "final"):
            await write(b'data: {"id":"cmpl-stub","object":"text_completion","created":0,"model":%s,"choices":[]'
                        % model.encode() + tail_usage % (pt, emitted, pt + emitted))
        await write(b"data: [DONE]\n\n")

    async def _fail_mid_stream(self, request: web.Request, resp: web.StreamResponse, failure: str) -> None:
        if failure == "error_mid_stream":
            await resp.write(b'data: {"error":{"message":"stub: injected engine error mid-stream",'
                             b'"type":"InternalServerError","code":500}}\n\n')
            await resp.write(b"data: [DONE]\n\n")
        elif failure == "bad_json":
            await resp.write(b"data: {this is not json\n\n")
        elif failure == "drop_connection":
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError  # the connection is gone; aiohttp must not finish the response
        # "no_done": return without [DONE]; aiohttp ends the chunked body normally


def _cpu_self_s() -> float:
    t = os.times()
    return t.user + t.system


# -- background thread (tests that drive a client from synchronous code) ---------------------

class StubServerThread:
    """The stub on its own event loop in a daemon thread: ``with StubServerThread(b) as stub``.

    For tests of synchronous entry points (``run_point``); ``stub.behavior`` can be swapped
    between requests. Start-up waits on an event under a deadline; exit stops the loop.
    """

    def __init__(self, behavior: StubBehavior | None = None, *, startup_timeout_s: float = 10.0) -> None:
        import threading

        self.server = StubOpenAIServer(behavior)
        self.startup_timeout_s = startup_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="pdperf-stub", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with self.server:
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:  # surfaced to the caller by __enter__
                self._error = e
                self._ready.set()
                raise

        asyncio.run(serve())

    def __enter__(self) -> StubOpenAIServer:
        self._thread.start()
        if not self._ready.wait(self.startup_timeout_s):
            raise TimeoutError(f"stub server thread: not listening within {self.startup_timeout_s:g} s")
        if self._error is not None:
            raise RuntimeError(f"stub server thread failed to start: {self._error!r}")
        return self.server

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


# -- separate process (benchmarks) ----------------------------------------------------------

class StubServerProcess:
    """The stub in its own process (own core, own event loop): ``with StubServerProcess(b) as url``.

    Start-up waits, under one deadline, for the announced URL and a healthy ``/health`` while
    checking the process is alive; the process group is killed on exit, also on failure.
    """

    def __init__(self, behavior: StubBehavior | None = None, *, python: str = sys.executable,
                 startup_timeout_s: float = 120.0, cpu: int | None = None) -> None:
        self.behavior = behavior or StubBehavior()
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.cpu = cpu
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    health_path = "/health"  # answered by the server itself once it serves

    def command(self) -> list[str]:
        """The server's command line (a subclass runs another server with the same start-up and exit)."""
        return [self.python, "-m", "pdperf.loadgen.stub_server", "--behavior", json.dumps(asdict(self.behavior))]

    def __enter__(self) -> str:
        args = self.command()
        if self.cpu is not None:
            args = ["taskset", "-c", str(self.cpu), *args]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                         os.path.abspath(__file__)))))
        try:
            self.url = self._await_ready()
        except BaseException:
            self.close()
            raise
        return self.url

    def _await_ready(self) -> str:
        import selectors

        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        url = ""
        while not url:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"stub server: no URL announced within {self.startup_timeout_s:g} s")
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"stub server exited with {self.proc.returncode} before announcing its URL: "
                                   f"{err[-2000:]}")
            if sel.select(timeout=min(left, 0.5)):
                line = self.proc.stdout.readline()
                if line.startswith("STUB_URL "):
                    url = line.split(None, 1)[1].strip()
        while True:
            try:
                with urllib.request.urlopen(url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"stub server exited with {self.proc.returncode} during start-up") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"stub server {url}: /health not ready within {self.startup_timeout_s:g} s")
            time.sleep(0.05)  # poll interval of a deadline-bounded readiness loop

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stub/stats", timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/stub/reset", method="POST", data=b"{}")
        with urllib.request.urlopen(req, timeout=5):
            pass

    def close(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # already gone
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.close()


async def serve_app(app: web.Application, host: str) -> tuple[web.AppRunner, str]:
    """``app`` listening on a free port of ``host``: its runner (cleanup() stops it) and its URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{host}:{port}"


async def announce_until_signalled(server: Any) -> None:
    """In a server process: enter ``server`` (an async context manager with a ``url``), print the
    line StubServerProcess waits for, and serve until SIGTERM or SIGINT."""
    async with server as s:
        print(f"STUB_URL {s.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


async def _serve_forever(behavior: StubBehavior) -> None:
    await announce_until_signalled(StubOpenAIServer(behavior))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdperf.loadgen.stub_server",
                                 description="Loopback STUB OpenAI streaming server (load-generator tests only).")
    ap.add_argument("--behavior", default="{}", help="JSON of StubBehavior fields")
    for f in fields(StubBehavior):
        ap.add_argument("--" + f.name.replace("_", "-"), default=None)
    args = ap.parse_args(argv)
    behavior = StubBehavior(**json.loads(args.behavior))
    overrides: dict[str, Any] = {}
    for f in fields(StubBehavior):
        v = getattr(args, f.name)
        if v is not None:
            default = getattr(StubBehavior(), f.name)
            overrides[f.name] = type(default)(v) if default is not None else int(v)
    behavior = replace(behavior, **overrides)
    try:
        import uvloop
        uvloop.run(_serve_forever(behavior))
    except ImportError:
        asyncio.run(_serve_forever(behavior))
    return 0


if __name__ == "__main__":
    sys.exit(main())
