"""SSE parsing and token accounting on synthetic streams with a fake clock (no network).

Each test builds the exact bytes a server would send, feeds them at chosen times, and checks
the RequestRecord and the metric definitions of pdperf.metrics on it.
"""

from __future__ import annotations

import json

import pytest

from pdperf import metrics
from pdperf.loadgen.client import (
    ACCOUNTING_CHUNKS,
    ACCOUNTING_CONTINUOUS,
    ACCOUNTING_FINAL,
    ACCOUNTING_FINAL_EXACT,
    SSEParser,
    StreamAccumulator,
    build_body,
    endpoint_url,
    spread_tokens,
    tokens_by_gap,
)
from pdperf.results import RequestRecord

pytestmark = pytest.mark.selftest


def ev(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def comp(text: str, ct: int | None = None, pt: int = 10) -> bytes:
    o: dict = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
    if ct is not None:
        o["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    return ev(o)


def chat(content: str | None, ct: int | None = None, role: bool = False, pt: int = 10) -> bytes:
    delta: dict = {"role": "assistant", "content": ""} if role else {"content": content}
    o: dict = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    if ct is not None:
        o["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    return ev(o)


def final_usage(ct: int, pt: int = 10) -> bytes:
    return ev({"choices": [], "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})


DONE = b"data: [DONE]\n\n"


def run(stream: list[tuple[float, bytes]], api: str = "completions", scheduled: float = 0.0,
        sent: float = 0.0) -> tuple[RequestRecord, StreamAccumulator]:
    rec = RequestRecord(index=0, scheduled_s=scheduled, sent_s=sent)
    acc = StreamAccumulator(rec, api, keep_text=True)  # type: ignore[arg-type]
    for t, data in stream:
        acc.feed(data, t)
    acc.finish()
    return rec, acc


# -- SSE framing ------------------------------------------------------------------------------

def test_sse_event_split_across_every_byte_boundary():
    raw = comp("a", 1) + comp("b", 2) + DONE
    for cut in range(1, len(raw)):
        p = SSEParser()
        out = p.feed(raw[:cut]) + p.feed(raw[cut:])
        assert len(out) == 3, cut
        assert out[-1] == b"[DONE]"
        assert json.loads(out[0])["choices"][0]["text"] == "a"


def test_sse_byte_by_byte_crlf_comments_and_multiline_data():
    raw = b": ping\r\n\r\ndata: {\"x\":\r\ndata: 1}\r\n\r\nevent: foo\nid: 3\ndata:[DONE]\n\n"
    p = SSEParser()
    out = []
    for i in range(len(raw)):
        out += p.feed(raw[i:i + 1])
    assert out == [b'{"x":\n1}', b"[DONE]"]
    assert p.pending == b""


def test_sse_unterminated_event_stays_pending():
    p = SSEParser()
    assert p.feed(b'data: {"a": 1}') == []
    assert p.pending == b'data: {"a": 1}'


# -- metric definitions on synthetic streams ---------------------------------------------------

def test_continuous_usage_timings_and_metric_definitions():
    # scheduled at 1.0, sent at 1.5 (queued), tokens at 2.0, 2.1, 2.3 (2 tokens), 2.4, done at 2.5
    stream = [(2.0, comp("a", 1)), (2.1, comp("b", 2)), (2.3, comp("cd", 4)), (2.4, comp("e", 5)),
              (2.5, final_usage(5) + DONE)]
    rec, acc = run(stream, scheduled=1.0, sent=1.5)
    assert rec.ok and acc.accounting == ACCOUNTING_CONTINUOUS
    assert rec.chunk_times_s == [2.0, 2.1, 2.3, 2.4]
    assert rec.chunk_tokens == [1, 1, 2, 1]
    assert rec.output_tokens == 5 and rec.input_tokens == 10
    assert rec.first_token_s == 2.0 and rec.end_s == 2.4  # last *content* chunk, not [DONE]
    assert metrics.ttft_ms(rec) == pytest.approx(1000.0)  # from the scheduled time, not the send
    assert metrics.queue_ms(rec) == pytest.approx(500.0)
    assert metrics.e2e_ms(rec) == pytest.approx(1400.0)
    assert metrics.tpot_ms(rec) == pytest.approx(400.0 / 4)
    # a 2-token chunk after 200 ms is two 100 ms samples, not one 200 ms stall
    assert metrics.itl_ms(rec) == pytest.approx([100.0, 100.0, 100.0, 100.0])
    assert acc.text == "abcde"


def test_one_output_token():
    rec, _ = run([(0.2, comp("x", 1)), (0.3, final_usage(1) + DONE)])
    assert rec.ok and rec.output_tokens == 1
    assert rec.first_token_s == rec.end_s == 0.2
    assert metrics.ttft_ms(rec) == pytest.approx(200.0)
    assert metrics.tpot_ms(rec) is None  # needs >= 2 tokens
    assert metrics.itl_ms(rec) == []


def test_empty_chunks_and_chat_role_chunk_carry_no_timestamp():
    stream = [(0.05, chat(None, 0, role=True)), (0.10, chat("", 0)), (0.20, chat("a", 1)), (0.25, chat("", 1)),
              (0.30, chat("b", 2)), (0.31, final_usage(2) + DONE)]
    rec, acc = run(stream, api="chat")
    assert rec.ok
    assert rec.chunk_times_s == [0.20, 0.30]
    assert rec.first_token_s == 0.20
    assert acc.text == "ab"


def test_token_with_empty_text_still_counts_when_usage_says_so():
    # e.g. a partial UTF-8 byte the server holds back: usage moved, text did not
    rec, _ = run([(0.1, comp("", 1)), (0.2, comp("ab", 2)), (0.3, final_usage(2) + DONE)])
    assert rec.first_token_s == 0.1 and rec.chunk_tokens == [1, 1]


def test_reasoning_content_counts_as_content_in_chat():
    o = {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    rec, _ = run([(0.1, ev(o)), (0.2, chat("a", 2)), (0.3, DONE)], api="chat")
    assert rec.first_token_s == 0.1 and rec.output_tokens == 2


def test_final_usage_only_spreads_tokens_over_chunks():
    stream = [(0.1, comp("a")), (0.2, comp("bc")), (0.3, comp("def")), (0.4, final_usage(7) + DONE)]
    rec, acc = run(stream)
    assert acc.accounting == ACCOUNTING_FINAL
    assert rec.output_tokens == 7
    assert rec.chunk_tokens == [1, 3, 3]
    assert sum(rec.chunk_tokens) == 7


def test_no_usage_counts_one_token_per_chunk_with_choices():
    # a token without text (an id the tokenizer decodes to "") still arrives as a chunk of its own
    rec, acc = run([(0.1, comp("a")), (0.2, comp("")), (0.3, comp("b")), (0.4, DONE)])
    assert acc.accounting == ACCOUNTING_CHUNKS
    assert rec.output_tokens == 3 and rec.chunk_tokens == [1, 1, 1]


def test_final_usage_equal_to_the_chunks_is_one_token_each():
    stream = [(0.1, comp("a")), (0.2, comp("")), (0.3, comp("c")), (0.4, final_usage(3) + DONE)]
    rec, acc = run(stream)
    assert acc.accounting == ACCOUNTING_FINAL_EXACT
    assert rec.output_tokens == 3 and rec.chunk_tokens == [1, 1, 1] and rec.end_s == 0.3


def test_chat_role_chunk_carries_no_token_without_usage():
    stream = [(0.05, chat(None, role=True)), (0.1, chat("a")), (0.2, chat("")), (0.3, final_usage(2) + DONE)]
    rec, acc = run(stream, api="chat")
    assert acc.accounting == ACCOUNTING_FINAL_EXACT
    assert rec.first_token_s == 0.1 and rec.chunk_times_s == [0.1, 0.2] and rec.output_tokens == 2


def test_larger_final_usage_adds_the_rest_to_the_last_chunk():
    rec, _ = run([(0.1, comp("a", 1)), (0.2, comp("b", 2)), (0.3, final_usage(4) + DONE)])
    assert rec.output_tokens == 4 and rec.chunk_tokens == [1, 3]


def test_extra_tokens_go_to_the_chunks_that_waited_longest():
    # one chunk came 2 steps late: it carried 2 tokens (a lagging server merges them)
    assert tokens_by_gap(6, [0.0, 0.01, 0.02, 0.04, 0.05]) == [1, 1, 1, 2, 1]
    assert tokens_by_gap(8, [0.0, 0.01, 0.04, 0.05]) == [1, 2, 3, 2]  # a 3-step wait: 3 tokens; then ties
    assert sum(tokens_by_gap(300, [i * 0.01 for i in range(256)])) == 300
    assert tokens_by_gap(5, [0.3]) == [5] and tokens_by_gap(3, []) == []


@pytest.mark.parametrize("total,n,expected", [(1, 1, [1]), (5, 1, [5]), (7, 3, [1, 3, 3]), (8, 3, [1, 4, 3]),
                                              (2, 4, [1, 1, 1, 1]), (10, 4, [1, 3, 3, 3])])
def test_spread_tokens(total, n, expected):
    assert spread_tokens(total, n) == expected


# -- errors ---------------------------------------------------------------------------------

def test_error_event_mid_stream():
    err = ev({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
    rec, _ = run([(0.1, comp("a", 1)), (0.2, comp("b", 2)), (0.3, err + DONE)])
    assert not rec.ok and rec.error == "stream"
    assert "engine died" in rec.error_detail
    assert rec.first_token_s == 0.1 and rec.output_tokens == 2  # what arrived is kept


def test_bad_json_is_a_stream_error():
    rec, _ = run([(0.1, comp("a", 1)), (0.2, ev(b"{nope")), (0.3, DONE)])
    assert rec.error == "stream" and "bad JSON" in rec.error_detail


def test_stream_cut_before_done():
    rec, _ = run([(0.1, comp("a", 1)), (0.2, b'data: {"choi')])
    assert rec.error == "stream" and "without [DONE]" in rec.error_detail


def test_done_without_any_token_is_empty():
    rec, _ = run([(0.1, final_usage(0) + DONE)])
    assert rec.error == "empty" and rec.first_token_s is None


def test_request_that_never_started_has_no_first_token():
    rec = RequestRecord(index=0, scheduled_s=0.0, sent_s=0.0)
    acc = StreamAccumulator(rec)
    acc.finish()
    assert rec.error == "stream" and rec.first_token_s is None and not rec.ok
    assert metrics.ttft_ms(rec) is None


def test_failed_requests_are_excluded_from_latency_samples():
    ok, _ = run([(0.1, comp("a", 1)), (0.2, comp("b", 2)), (0.3, DONE)])
    bad, _ = run([(0.5, comp("a", 1)), (0.6, ev({"error": {"message": "x"}}))])
    s = metrics.summarize([ok, bad], duration_s=1.0)
    assert s.requests_failed == 1 and s.errors == {"stream": 1}
    assert s.metrics["ttft_ms"].n == 1


# -- request construction -----------------------------------------------------------------------

def test_body_fixes_output_length_without_min_tokens():
    body = json.loads(build_body(model="m", prompt="hi", max_tokens=64))
    assert body["max_tokens"] == 64 and body["ignore_eos"] is True
    assert "min_tokens" not in body
    assert body["stream"] is True


def test_body_asks_the_server_for_what_vllm_bench_asks_unless_told():
    body = json.loads(build_body(model="m", prompt="hi", max_tokens=64))
    assert "temperature" not in body  # the server's default sampling
    assert body["stream_options"] == {"include_usage": True}  # no per-chunk usage: server CPU per chunk
    body = json.loads(build_body(model="m", prompt="hi", max_tokens=64, temperature=0, per_chunk_usage=True))
    assert body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    chat_body = json.loads(build_body(model="m", prompt="hi", max_tokens=4, api="chat"))
    assert chat_body["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in chat_body


@pytest.mark.parametrize("base,api,url", [
    ("http://127.0.0.1:8123", "completions", "http://127.0.0.1:8123/v1/completions"),
    ("http://127.0.0.1:8123/pd-1p1d/", "completions", "http://127.0.0.1:8123/pd-1p1d/v1/completions"),
    ("http://127.0.0.1:8123/v1", "chat", "http://127.0.0.1:8123/v1/chat/completions"),
])
def test_endpoint_url(base, api, url):
    assert endpoint_url(base, api) == url


# -- the fast decoder agrees with the reference decoder ------------------------------------------

@pytest.mark.parametrize("payload", [
    comp("a", 3)[6:-2], chat("b", 2)[6:-2], chat(None, 0, role=True)[6:-2], final_usage(5)[6:-2],
    b'{"choices":[{"index":0,"delta":{"reasoning":"r"}}]}',
    b'{"choices":[{"index":0,"text":null}],"usage":null}',
    b'{"error":"plain string error"}', b'{"error":{"message":"m","code":500}}',
    b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"extra":{"x":1}}}',
    b'{"choices":["not an object"]}',  # an odd shape: the fast decoder must hand it to the reference one
    b'{"usage":{"completion_tokens":"7"}}',
])
def test_fast_decoder_matches_the_reference(payload):
    from pdperf.loadgen.client import _decode_generic, decode_event

    assert decode_event(payload) == _decode_generic(payload)


@pytest.mark.parametrize("payload", [b"{nope", b"[1, 2]", b'"str"'])
def test_both_decoders_reject_non_objects(payload):
    from pdperf.loadgen.client import _decode_generic, decode_event

    for dec in (decode_event, _decode_generic):
        with pytest.raises(ValueError):
            dec(payload)


def test_fast_path_and_split_reads_give_the_same_record():
    events = [comp("a", 1), chat(None, 1)[:0] + comp("bc", 3), comp("d", 4), final_usage(4) + DONE]
    whole, _ = run([(0.1 * (i + 1), e) for i, e in enumerate(events)])
    raw = b"".join(events)
    rec = RequestRecord(index=0, scheduled_s=0.0, sent_s=0.0)
    acc = StreamAccumulator(rec)
    pos = 0
    for i, e in enumerate(events):  # same arrival times, but every event cut in two reads
        half = len(e) // 2
        acc.feed(raw[pos:pos + half], 0.1 * (i + 1) - 0.01)
        acc.feed(raw[pos + half:pos + len(e)], 0.1 * (i + 1))
        pos += len(e)
    acc.finish()
    assert rec == whole
