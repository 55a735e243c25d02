"""Streaming OpenAI client and load models: the part of the suite that must not lie.

Why it is written this way:

- **Clocks start at the scheduled send time.** A request's ``scheduled_s`` is when the load
  model wanted it sent (open loop: its arrival time; closed loop: the moment a worker slot
  became free). Time spent behind the concurrency cap or behind a late event loop shows up
  as ``queue_ms`` and inside TTFT/E2E, instead of being hidden (vLLM issue 54101).
- **The request is the peer's request.** The body carries what ``vllm bench serve`` sends
  (prompt, ``max_tokens``, ``ignore_eos``, ``stream_options.include_usage``) and nothing that
  costs the server time: no ``temperature`` unless the workload names one (the server's
  default, as ``vllm bench serve`` since it stopped forcing greedy), no per-chunk usage unless
  the workload asks for it (``per_chunk_usage``: ~2.5 us more of the API server's CPU per
  chunk, measured on this CPU). docs/METHODOLOGY.md "Same load, same server" has the A/B runs.
- **Tokens come from the server's usage, not from guesses.** vLLM sends one chunk per engine
  step per request; a chunk can still carry several tokens when the server's handler falls
  behind. The final ``usage.completion_tokens`` is checked against the token-bearing chunks:
  equal (the rule under load too, measured) means one token each, exact; otherwise the rest
  is spread and the record says so (:meth:`StreamAccumulator.finish`). With per-chunk usage
  every chunk's ``completion_tokens`` delta is its count.
- **Cheap per event.** One ``aiohttp.ClientSession`` (connector without a limit, so the
  load model and not the connector decides concurrency), request bodies serialised before
  the clock starts, one ``perf_counter()`` per socket read (every event in one read arrived
  together), a fast path for a read that holds exactly one event, no text kept unless asked,
  and msgspec decoding only the fields read (where installed; ``json`` otherwise, with the
  same results). aiohttp's own per-read cost is most of what remains (benchmarks/README.md).
- **Errors are data.** Every failure becomes a ``RequestRecord.error`` kind with a detail
  (HTTP status and the first 300 characters of the body, or the exception), never a crash.

The parsing and accounting (:class:`SSEParser`, :class:`StreamAccumulator`) take the arrival
time as an argument, so the unit tests drive them with a fake clock and synthetic streams.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import numpy as np

from pdperf.results import RequestRecord

Api = Literal["completions", "chat"]
API_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_DETAIL_CHARS = 300
_DONE = b"[DONE]"

# How a request's output tokens were counted (see StreamAccumulator.finish).
ACCOUNTING_CONTINUOUS = "continuous_usage"  # per-chunk completion_tokens deltas
ACCOUNTING_FINAL_EXACT = "final_usage_exact"  # final usage == token-bearing chunks: one token each
ACCOUNTING_FINAL = "final_usage"  # final usage != chunks: the remainder spread over chunks (estimate)
ACCOUNTING_CHUNKS = "chunk_count"  # no usage at all: one token per content chunk (a guess)


def endpoint_url(base_url: str, api: Api) -> str:
    """``http://host:port[/route]`` + the API path; a trailing ``/v1`` in the base is tolerated."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + API_PATHS[api]


def build_body(*, model: str, prompt: str, max_tokens: int, api: Api = "completions",
               temperature: float | None = None, per_chunk_usage: bool = False,
               extra: dict[str, Any] | None = None) -> bytes:
    """The JSON body of one streamed request, serialised once, before any clock starts.

    ``ignore_eos`` + ``max_tokens`` fix the output length; ``min_tokens`` is never sent
    because Ray Serve LLM's PD path rejects it (HTTP 400). ``temperature`` None leaves
    sampling to the server's defaults; ``per_chunk_usage`` asks for
    ``continuous_usage_stats`` (server CPU per chunk; see the module docstring).
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": int(max_tokens),
        "ignore_eos": True,
        "stream": True,
        "stream_options": ({"include_usage": True, "continuous_usage_stats": True} if per_chunk_usage
                           else {"include_usage": True}),
    }
    if temperature is not None:
        body["temperature"] = float(temperature)
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if extra:
        body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready to send: its body bytes and what the server should report back."""

    index: int
    body: bytes
    input_tokens: int  # the ISL the dataset built (the server's prompt_tokens should match)
    output_tokens: int  # max_tokens with ignore_eos: the exact output length expected
    warmup: bool = False


# An event, decoded: (error or None, carries a token, text, usage.completion_tokens, usage.prompt_tokens).
# A chunk carries a token when it has choices and is not the chat API's role chunk (``delta.role``):
# vLLM sends one such chunk per engine step per request, also when the token decodes to no text.
Event = tuple[Any, bool, "str | None", "int | None", "int | None"]


def _decode_generic(payload: bytes) -> Event:
    """Any JSON object event, through the standard library (the reference decoder)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        raise ValueError("bad JSON in stream") from None
    if not isinstance(obj, dict):
        raise ValueError("stream event is not a JSON object")
    err = obj.get("error")
    if err is not None:
        return err, False, None, None, None
    choices = obj.get("choices")
    text = None
    token = bool(choices)
    if choices:
        ch = choices[0] if isinstance(choices[0], dict) else {}
        text = ch.get("text")
        if text is None:
            delta = ch.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
            token = delta.get("role") is None
    usage = obj.get("usage") or {}
    ct, pt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return None, token, text, (int(ct) if ct is not None else None), (int(pt) if pt is not None else None)


try:  # msgspec (a vLLM dependency) decodes only the fields read here, ~5x faster than json
    import msgspec

    class _Usage(msgspec.Struct):
        prompt_tokens: int | None = None
        completion_tokens: int | None = None

    class _Delta(msgspec.Struct):
        role: str | None = None
        content: str | None = None
        reasoning_content: str | None = None
        reasoning: str | None = None

    class _Choice(msgspec.Struct):
        text: str | None = None
        delta: _Delta | None = None

    class _Chunk(msgspec.Struct):
        choices: list[_Choice] | None = None
        usage: _Usage | None = None
        error: Any = None

    _DECODER = msgspec.json.Decoder(_Chunk)
    _MSGSPEC_ERROR: type[Exception] = msgspec.MsgspecError

    def decode_event(payload: bytes) -> Event:
        """Decode one ``data:`` payload; an unexpected shape falls back to the generic decoder."""
        try:
            c = _DECODER.decode(payload)
        except _MSGSPEC_ERROR:
            return _decode_generic(payload)
        if c.error is not None:
            return c.error, False, None, None, None
        choices = c.choices
        text = None
        token = bool(choices)
        if choices:
            first = choices[0]
            text = first.text
            if text is None and first.delta is not None:
                d = first.delta
                text = d.content or d.reasoning_content or d.reasoning
                token = d.role is None
        u = c.usage
        if u is None:
            return None, token, text, None, None
        return None, token, text, u.completion_tokens, u.prompt_tokens

    DECODER_NAME = f"msgspec {msgspec.__version__}"
except ImportError:
    decode_event = _decode_generic
    DECODER_NAME = "json (stdlib)"


class SSEParser:
    """Incremental Server-Sent Events parser: bytes in, complete ``data`` payloads out.

    An event ends at a blank line (``\\n\\n``; ``\\r\\n`` is normalised), so an event split
    across socket reads is held until its end arrives. Comment lines (``:``) and fields other
    than ``data`` are skipped; several ``data`` lines of one event are joined with ``\\n``.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        tail = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # maybe the first half of a \r\n split across reads
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n\n" not in buf:
            self._buf = buf + tail
            return []
        events = buf.split(b"\n\n")
        self._buf = events.pop() + tail
        out: list[bytes] = []
        for ev in events:
            if ev.startswith(b"data: ") and b"\n" not in ev:  # the common case: one data line
                out.append(ev[6:])
                continue
            lines = [ln for ln in ev.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(ln[6:] if ln.startswith(b"data: ") else ln[5:] for ln in lines))
        return out

    @property
    def pending(self) -> bytes:
        """Bytes of an event whose end has not arrived (non-empty at EOF means a cut stream)."""
        return self._buf


class StreamAccumulator:
    """Turns one response's SSE payloads into a :class:`RequestRecord`'s timings and tokens.

    ``feed(data, now_s)`` takes raw body bytes and their arrival time. A chunk is
    *content-bearing* when it carries tokens: with continuous usage, a positive
    ``completion_tokens`` delta; otherwise any chunk with choices but the chat role chunk
    (its text may be empty: a token without text is still a token). Chunks without tokens
    (the chat role chunk, the final usage chunk) add no timestamp.
    """

    __slots__ = ("record", "api", "keep_text", "parser", "text_parts", "last_completion_tokens",
                 "continuous", "final_prompt_tokens", "final_completion_tokens", "done", "error",
                 "error_detail", "accounting", "_chat")

    def __init__(self, record: RequestRecord, api: Api = "completions", keep_text: bool = False) -> None:
        self.record = record
        self.api = api
        self._chat = api == "chat"
        self.keep_text = keep_text
        self.parser = SSEParser()
        self.text_parts: list[str] = []
        self.last_completion_tokens = 0
        self.continuous = False
        self.final_prompt_tokens: int | None = None
        self.final_completion_tokens: int | None = None
        self.done = False
        self.error: str | None = None
        self.error_detail: str | None = None
        self.accounting: str | None = None

    def feed(self, data: bytes, now_s: float) -> None:
        if self.error is not None:
            return
        parser = self.parser
        # Fast path, the common case under load: the read holds exactly one one-line event.
        if (not parser._buf and data[:6] == b"data: " and data[-2:] == b"\n\n" and data.count(b"\n") == 2
                and b"\r" not in data):
            self._event(data[6:-2], now_s)
            return
        for payload in parser.feed(data):
            self._event(payload, now_s)
            if self.error is not None:
                return

    def _event(self, payload: bytes, now_s: float) -> None:
        if payload[:1] != b"{" and payload.strip() == _DONE:
            self.done = True
            return
        try:
            err, carries_token, text, ct, pt = decode_event(payload)
        except ValueError as e:
            self._fail("stream", f"{e}: {payload[:ERROR_DETAIL_CHARS]!r}")
            return
        if err is not None:
            self._fail("stream", f"error event mid-stream: {json.dumps(err, default=str)[:ERROR_DETAIL_CHARS]}")
            return
        if carries_token:
            if ct is not None:
                n = ct - self.last_completion_tokens
                self.last_completion_tokens = ct
                self.continuous = True
                if pt is not None:
                    self.final_prompt_tokens = pt
                if n <= 0:
                    if text and self.keep_text:
                        self.text_parts.append(text)
                    return
            else:
                n = 0  # resolved in finish(): one token, unless the final usage says otherwise
            rec = self.record
            if rec.first_token_s is None:
                rec.first_token_s = now_s
            rec.end_s = now_s
            rec.chunk_times_s.append(now_s)
            rec.chunk_tokens.append(n)
            if text and self.keep_text:
                self.text_parts.append(text)
        else:
            if ct is not None:
                self.final_completion_tokens = ct
            if pt is not None:
                self.final_prompt_tokens = pt

    def _fail(self, kind: str, detail: str) -> None:
        self.error = kind
        self.error_detail = detail

    def finish(self, *, eof_error: str | None = None) -> RequestRecord:
        """Close the accounting after the body ended (``eof_error``: why it ended early).

        Token rule: with continuous usage, each content chunk carries its delta and a larger
        final ``completion_tokens`` adds the rest to the last chunk. With only a final usage
        that equals the number of token-bearing chunks, each chunk held one token (exact,
        ``final_usage_exact``); with more tokens than chunks (a server that fell behind sends
        several tokens in one chunk, after a longer wait) the extra tokens go to the chunks
        that waited longest (:func:`tokens_by_gap`; ``final_usage``, an estimate).
        Without any usage, every content chunk counts one token and the record's accounting
        says ``chunk_count``.
        """
        rec = self.record
        tokens = rec.chunk_tokens
        n_chunks = len(tokens)
        if self.continuous:
            self.accounting = ACCOUNTING_CONTINUOUS
            total = self.last_completion_tokens
            if self.final_completion_tokens is not None and self.final_completion_tokens > total and n_chunks:
                tokens[-1] += self.final_completion_tokens - total
                total = self.final_completion_tokens
            # Text-only chunks after usage started (should not happen) count one token each.
            for i, k in enumerate(tokens):
                if k <= 0:
                    tokens[i] = 1
                    total += 1
        elif self.final_completion_tokens is not None:
            total = self.final_completion_tokens
            self.accounting = ACCOUNTING_FINAL_EXACT if total == n_chunks else ACCOUNTING_FINAL
            if n_chunks:
                tokens[:] = (tokens_by_gap(total, rec.chunk_times_s) if total > n_chunks
                             else spread_tokens(total, n_chunks))
        else:
            self.accounting = ACCOUNTING_CHUNKS
            total = n_chunks
            tokens[:] = [1] * n_chunks
        rec.output_tokens = int(total)
        if self.final_prompt_tokens is not None:
            rec.input_tokens = int(self.final_prompt_tokens)
        if self.error is not None:
            rec.error, rec.error_detail = self.error, self.error_detail
        elif eof_error is not None:
            rec.error, rec.error_detail = "stream", eof_error
        elif not self.done:
            rec.error = "stream"
            rec.error_detail = (f"stream ended without [DONE] after {rec.output_tokens} tokens"
                                + (f"; unterminated event {self.parser.pending[:100]!r}" if self.parser.pending else ""))
        elif rec.first_token_s is None:
            rec.error, rec.error_detail = "empty", "stream completed with [DONE] but carried no token"
        return rec

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def tokens_by_gap(total: int, times_s: Sequence[float]) -> list[int]:
    """Tokens per chunk when ``total`` tokens came in fewer chunks, none of which said how many.

    A chunk that holds k tokens is one the server sent late, after about k decode steps, so
    each extra token goes to the chunk whose wait per token is longest (water-filling on
    ``gap / tokens``); the first chunk (its wait is the prefill) keeps 1. Seen through Ray Serve
    LLM on one H200 at c16: 39 of 128 requests had fewer chunks than tokens.
    """
    n = len(times_s)
    if n <= 1:
        return [max(total, 1)] if n else []
    tokens = [1] * n
    heap = [(-(times_s[i] - times_s[i - 1]), i) for i in range(1, n)]
    heapq.heapify(heap)
    for _ in range(total - n):
        _, i = heapq.heappop(heap)
        tokens[i] += 1
        heapq.heappush(heap, (-(times_s[i] - times_s[i - 1]) / tokens[i], i))
    return tokens


def spread_tokens(total: int, n_chunks: int) -> list[int]:
    """Token counts of ``n_chunks`` chunks that together carried ``total`` tokens (final usage only).

    The first chunk gets 1, the rest ``total - 1`` evenly (earlier chunks take the remainder);
    every chunk carries at least 1 (a content chunk held a token) even if ``total`` says fewer.
    """
    if n_chunks <= 0:
        return []
    if n_chunks == 1:
        return [max(total, 1)]
    rest = max(total - 1, n_chunks - 1)
    base, extra = divmod(rest, n_chunks - 1)
    return [1] + [base + (1 if i < extra else 0) for i in range(n_chunks - 1)]


class StallWatch:
    """Ends a stream that stopped sending tokens: no new token for ``idle_s`` after the first one.

    A server that holds a stream open without sending (a stuck engine, a lost KV transfer, a proxy
    that stalls) would otherwise hold the request until the total request timeout (600 s by
    default), and the point would say only "not finished". Before the first token the total
    timeout alone applies: time to first token includes queueing, which is long under overload
    and is a measurement, not a fault.

    Cheap per chunk: nothing is done per read (the record's chunk times are already kept). A
    timer wakes every ``idle_s / 4`` and compares the number of token chunks with the last
    wake-up; a stall is seen between ``idle_s`` and ``1.25 * idle_s`` after the last token. It
    ends the read by closing the response (``on_stall``), which the read loop sees as the end or
    a cut of the body, and ``stalled`` tells the client why; no task is cancelled, so an outside
    cancellation (Ctrl-C) stays what it is, on every Python the suite supports.
    """

    __slots__ = ("chunk_times", "idle_s", "stalled", "_on_stall", "_handle", "_seen", "_since", "_loop")

    def __init__(self, chunk_times: list[float], idle_s: float, on_stall: Callable[[], None]) -> None:
        self.chunk_times = chunk_times
        self.idle_s = idle_s
        self.stalled = False
        self._on_stall = on_stall
        self._handle: asyncio.TimerHandle | None = None
        self._seen = 0
        self._since = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._seen, self._since = len(self.chunk_times), loop.time()
        self._handle = loop.call_at(self._since + self.idle_s / 4, self._check)

    def _check(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        n = len(self.chunk_times)
        if n != self._seen or not n:  # a token came since the last look, or none yet (TTFT: not watched)
            self._seen, self._since = n, now
        elif now - self._since >= self.idle_s:
            self.stalled = True
            self._handle = None
            self._on_stall()
            return
        self._handle = self._loop.call_at(now + self.idle_s / 4, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _http_error(status: int, body: bytes) -> tuple[str, str]:
    kind = "http_5xx" if status >= 500 else "http_4xx"
    text = body.decode("utf-8", "replace")[:ERROR_DETAIL_CHARS]
    return kind, f"HTTP {status}: {text}"


@dataclass
class ClientStats:
    """Counts the point reports next to its records (how tokens were counted, length checks)."""

    accounting: dict[str, int] = field(default_factory=dict)
    output_length_mismatch: int = 0  # ok requests whose output_tokens != max_tokens
    input_length_mismatch: int = 0  # ok requests whose prompt_tokens != the dataset's ISL

    def merge(self, other: ClientStats) -> None:
        for k, v in other.accounting.items():
            self.accounting[k] = self.accounting.get(k, 0) + v
        self.output_length_mismatch += other.output_length_mismatch
        self.input_length_mismatch += other.input_length_mismatch


class StreamingClient:
    """One aiohttp session that sends :class:`PreparedRequest` s and records their streams.

    Use as ``async with StreamingClient(base_url, api=...) as client``. The connector has no
    connection limit (``limit=0``): concurrency is the load model's job, so no request waits
    invisibly for a pooled connection.
    """

    HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}

    def __init__(self, base_url: str, *, api: Api = "completions", timeout_s: float = 600.0,
                 idle_timeout_s: float | None = None, keep_text: bool = False,
                 clock: Callable[[], float] = time.perf_counter, read_bufsize: int = 1 << 16) -> None:
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"stream idle timeout {idle_timeout_s!r} s: must be > 0, or None for none")
        self.url = endpoint_url(base_url, api)
        self.api = api
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.keep_text = keep_text
        self.clock = clock
        self.read_bufsize = read_bufsize
        self.stats = ClientStats()
        self.last_text: dict[int, str] = {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 30.0))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamingClient:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False,
                                         keepalive_timeout=120, use_dns_cache=True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, read_bufsize=self.read_bufsize,
            trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("StreamingClient: use it as `async with StreamingClient(...) as client`")
        return self._session

    async def send(self, req: PreparedRequest, scheduled_s: float, worker: int = 0) -> RequestRecord:
        """Send one request whose clock started at ``scheduled_s``; always returns a record."""
        clock = self.clock
        rec = RequestRecord(index=req.index, scheduled_s=scheduled_s, warmup=req.warmup, worker=worker,
                            input_tokens=req.input_tokens)
        acc = StreamAccumulator(rec, self.api, self.keep_text)
        got_headers = False
        eof_error: str | None = None
        watch: StallWatch | None = None
        rec.sent_s = clock()
        try:
            # aiohttp's total timeout covers connect, send and reading the whole body
            async with self.session.post(self.url, data=req.body, headers=self.HEADERS,
                                         timeout=self._timeout) as resp:
                got_headers = True
                if resp.status != 200:
                    body = await resp.content.read(4 * ERROR_DETAIL_CHARS)
                    rec.error, rec.error_detail = _http_error(resp.status, body)
                    return rec
                content = resp.content
                feed = acc.feed
                if self.idle_timeout_s is not None:
                    watch = StallWatch(rec.chunk_times_s, self.idle_timeout_s, resp.close)
                    watch.start()
                try:
                    while True:
                        data = await content.readany()
                        if not data:
                            break
                        feed(data, clock())
                        if acc.error is not None:
                            break
                finally:
                    if watch is not None:
                        watch.stop()
        except asyncio.TimeoutError:  # TimeoutError itself on 3.11+
            acc.finish()
            rec.error = "timeout"
            rec.error_detail = (f"no first token within the {self.timeout_s:g} s request timeout"
                                if rec.first_token_s is None else
                                f"not finished within the {self.timeout_s:g} s request timeout after "
                                f"{rec.output_tokens} tokens")
            return rec
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                ConnectionError) as e:
            if not got_headers:
                rec.error, rec.error_detail = "connection", f"{type(e).__name__}: {e}"[:ERROR_DETAIL_CHARS]
                return rec
            eof_error = f"connection dropped mid-stream: {type(e).__name__}: {e}"[:ERROR_DETAIL_CHARS]
        except aiohttp.ClientError as e:
            if watch is None or not watch.stalled:
                rec.error, rec.error_detail = "connection", f"{type(e).__name__}: {e}"[:ERROR_DETAIL_CHARS]
                return rec
        if watch is not None and watch.stalled:  # the watch closed the response: whatever the read saw, a stall
            acc.finish()
            rec.error = "timeout"
            rec.error_detail = (f"stream stalled: no token for {watch.idle_s:g} s after {rec.output_tokens} "
                                f"tokens (the workload's stream_idle_timeout_s)")
            return rec
        acc.finish(eof_error=eof_error)
        st = self.stats
        if acc.accounting is not None:
            st.accounting[acc.accounting] = st.accounting.get(acc.accounting, 0) + 1
        if rec.ok:
            if rec.output_tokens != req.output_tokens:
                st.output_length_mismatch += 1
            if acc.final_prompt_tokens is not None and acc.final_prompt_tokens != req.input_tokens:
                st.input_length_mismatch += 1
        if self.keep_text:
            self.last_text[req.index] = acc.text
        return rec


# --------------------------------------------------------------------------------------------
# Load models
# --------------------------------------------------------------------------------------------

def arrival_offsets_s(n: int, rate_per_s: float, *, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seeded open-loop arrival times (seconds after the start) of ``n`` requests.

    Gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / rate``: shape 1 is a
    Poisson process, shape < 1 burstier, > 1 smoother (vLLM bench's convention). The first
    request arrives at 0.
    """
    if n <= 0:
        return np.zeros(0)
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"arrival rate {rate_per_s!r} req/s: must be a finite number > 0")
    if burstiness <= 0:
        raise ValueError(f"burstiness {burstiness!r}: must be > 0 (1.0 is Poisson)")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate_per_s * burstiness), size=n - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


async def _sleep_until(t_s: float, clock: Callable[[], float]) -> None:
    delay = t_s - clock()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_closed_loop(client: StreamingClient, requests: Sequence[PreparedRequest], *, concurrency: int,
                          t0_s: float, stop_at_s: float | None = None, worker: int = 0) -> list[RequestRecord]:
    """``concurrency`` slots, each sending the next request as soon as its previous one ended.

    A slot's first request is scheduled at ``t0_s``; each later one at the moment the slot
    became free. No new request is scheduled at or after ``stop_at_s``.
    """
    if concurrency < 1:
        raise ValueError(f"closed loop: concurrency {concurrency} must be >= 1")
    clock = client.clock
    it = iter(requests)
    records: list[RequestRecord] = []

    async def slot() -> None:
        await _sleep_until(t0_s, clock)
        scheduled = t0_s
        for req in it:
            if stop_at_s is not None and scheduled >= stop_at_s:
                return
            records.append(await client.send(req, scheduled, worker))
            scheduled = clock()

    await asyncio.gather(*(slot() for _ in range(min(concurrency, max(len(requests), 1)))))
    return records


async def run_open_loop(client: StreamingClient, requests: Sequence[PreparedRequest], offsets_s: Sequence[float], *,
                        t0_s: float, max_concurrency: int | None = None, stop_at_s: float | None = None,
                        worker: int = 0) -> list[RequestRecord]:
    """Send request ``i`` at ``t0_s + offsets_s[i]`` whatever the server does (open loop).

    With ``max_concurrency``, a request that arrives while the cap is full waits; its clock
    already runs (``scheduled_s`` is the arrival), so the wait is its ``queue_ms``.
    """
    if len(offsets_s) < len(requests):
        raise ValueError(f"open loop: {len(offsets_s)} arrival times for {len(requests)} requests")
    clock = client.clock
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks: list[asyncio.Task[RequestRecord]] = []

    async def capped(req: PreparedRequest, scheduled: float) -> RequestRecord:
        assert sem is not None
        async with sem:
            return await client.send(req, scheduled, worker)

    for req, off in zip(requests, offsets_s):
        scheduled = t0_s + float(off)
        if stop_at_s is not None and scheduled >= stop_at_s:
            break
        await _sleep_until(scheduled, clock)
        coro = capped(req, scheduled) if sem is not None else client.send(req, scheduled, worker)
        tasks.append(asyncio.create_task(coro))
    return list(await asyncio.gather(*tasks))


@dataclass(frozen=True)
class LoopLag:
    """How late the event loop woke up over a phase (None without samples)."""

    p99_ms: float | None
    max_ms: float | None


class LoopLagMonitor:
    """Measures how late the event loop wakes up: the client's own saturation signal.

    A late loop delays every chunk's timestamp, so lag directly inflates measured ITL/TTFT.
    It wakes every ``interval_s`` (the runner uses 25 ms: 40 wake-ups a second, negligible cost).
    """

    def __init__(self, interval_s: float = 0.01, clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        clock, interval = self.clock, self.interval_s
        while True:
            t = clock()
            await asyncio.sleep(interval)
            self.lags_s.append(max(clock() - t - interval, 0.0))

    def start(self) -> None:
        self.lags_s = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> LoopLag:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass  # the cancellation we asked for
            self._task = None
        return self.summary()

    def summary(self) -> LoopLag:
        if not self.lags_s:
            return LoopLag(None, None)
        arr = np.asarray(self.lags_s) * 1000.0
        return LoopLag(float(np.percentile(arr, 99)), float(arr.max()))
