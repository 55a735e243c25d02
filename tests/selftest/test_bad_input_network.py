"""A URL that is not an OpenAI streaming server: the user gets one line; a load point gets records.

Three wrong servers, each on a free loopback port: nothing listening (connection refused), a web
server that answers every path with an HTML page (a proxy's landing page, a wrong port), and the
stub streaming events that are not JSON (an incompatible server). ``pdperf query URL`` must end
with exit status 2 and one line naming the URL and what went wrong. The load generator
(``run_point``, as the suite's ``measure`` calls it) must not raise: every request is a record
carrying its error kind, and the point is errored (never a pass: pdperf.gate.point).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdperf.gate.point import judge
from pdperf.gate.thresholds import load_thresholds
from pdperf.loadgen.runner import run_point
from pdperf.loadgen.stub_server import StubBehavior, StubServerThread
from pdperf.specs import Sweep, Workload
from pdperf.waiting import free_port
from tests.selftest.test_bad_input import cli, make_tokenizer

pytestmark = pytest.mark.selftest

HTML = b"<!doctype html>\n<html><head><title>Welcome</title></head>\n\n<body><h1>It works</h1></body></html>\n"


class _HtmlHandler(http.server.BaseHTTPRequestHandler):
    """Every GET and POST gets the same HTML page with status 200, as a web server's default site."""

    def _page(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(HTML)))
        self.end_headers()
        self.wfile.write(HTML)

    def do_GET(self) -> None:  # noqa: N802 - http.server's handler names
        self._page()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._page()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        pass  # keep the test's output to the assertions


@pytest.fixture(scope="module")
def html_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, name="html-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def bad_sse_url() -> Iterator[str]:
    with StubServerThread(StubBehavior(failure="bad_json", fail_after_tokens=0)) as stub:
        yield stub.url


@pytest.fixture
def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def the_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- pdperf query URL ----------------------------------------------------------------------------

def test_query_unreachable_url(refused_url):
    """Before the request: the served model is looked up at /v1/models, and nothing answers."""
    code, out, err = cli("query", refused_url)
    assert code == 2, out + err
    line = the_line(err)
    assert line.startswith(f"error: {refused_url}: cannot connect (") and "Connection refused" in line
    assert line.endswith("check the URL and that the server is up")


def test_query_unreachable_url_with_model(refused_url):
    code, out, err = cli("query", refused_url, "--model", "m")
    assert code == 2, out + err
    line = the_line(err)
    assert line.startswith(f"error: {refused_url}: request failed: connection: ")
    assert "Cannot connect to host" in line


def test_query_url_answering_html(html_url):
    code, out, err = cli("query", html_url)
    assert code == 2, out + err
    line = the_line(err)
    assert html_url in line and "not an OpenAI" in line


def test_query_url_answering_html_with_model(html_url):
    """With --model the look-up is skipped: the streamed request gets a page, not events."""
    code, out, err = cli("query", html_url, "--model", "m")
    assert code == 2, out + err
    line = the_line(err)
    assert line.startswith(f"error: {html_url}: request failed: stream: stream ended without [DONE] after 0 tokens")


def test_query_url_answering_invalid_sse(bad_sse_url):
    code, out, err = cli("query", bad_sse_url)
    assert code == 2, out + err
    assert the_line(err).startswith(f"error: {bad_sse_url}: request failed: stream: bad JSON in stream: "
                                    "b'{this is not json'")


# -- the load generator --------------------------------------------------------------------------

def _workload() -> Workload:
    return Workload(name="bad-url", isl=32, osl=8, request_timeout_s=10,
                    sweep=Sweep(kind="concurrency", points=[4], requests_per_point=8, warmup_requests=2))


@pytest.mark.parametrize("server,kind,detail", [
    ("refused_url", "connection", "Cannot connect to host"),
    ("html_url", "stream", "stream ended without [DONE] after 0 tokens"),
    ("bad_sse_url", "stream", "bad JSON in stream"),
], ids=["unreachable", "html-page", "invalid-sse"])
def test_load_point_against_a_wrong_server_records_every_failure(request, tok_dir, server, kind, detail):
    url = request.getfixturevalue(server)
    r = run_point(base_url=url, model="m", tokenizer_path=tok_dir, workload=_workload(), point=4, topology="wrong",
                  gpus=0, processes=0)
    assert len(r.records) == 10 and all(not x.ok and x.error == kind for x in r.records)
    assert detail in (r.records[0].error_detail or "")
    assert r.summary.requests == 8 and r.summary.requests_failed == 8 and r.summary.errors == {kind: 8}
    assert "requests_failed:8" in r.flags
    v = judge(r, test_id="t", baselines_root=tok_dir, thresholds=load_thresholds())
    assert v.errored and v.gate is None  # errored: no SLO or gate verdict, a failure
    assert (v.failure_message() or "").startswith(f"errored, no performance verdict: 8 of 8 requests failed "
                                                  f"(error budget 0): 8 {kind} (")
