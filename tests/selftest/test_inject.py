"""The slowdown proxy (pdperf.inject) against the stub server: the point is the proxy itself,
whether it dilates a stream's time by exactly the factor asked, so a stub with a known pace is
the right upstream. Its use on the real stack is benchmarks/gate_detection.py."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from pdperf.inject import SlowdownProxyProcess, main
from pdperf.loadgen.stub_server import StubBehavior, StubServerProcess

pytestmark = pytest.mark.selftest


def stream_times(url: str, tokens: int) -> tuple[float, float, int]:
    """Seconds to the first chunk and to the end of one streamed completion, and its data lines."""
    body = json.dumps({"model": "stub-model", "prompt": "a b c", "max_tokens": tokens, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    first = None
    lines = 0
    with urllib.request.urlopen(req, timeout=30) as r:
        for raw in r:
            if raw.startswith(b"data:"):
                lines += 1
                if first is None:
                    first = time.monotonic() - t0
    return first or 0.0, time.monotonic() - t0, lines


def test_proxy_dilates_ttft_and_stream_by_the_factor():
    with StubServerProcess(StubBehavior(ttft_s=0.2, token_interval_s=0.02)) as upstream:
        direct = [stream_times(upstream, 20) for _ in range(3)]
        with SlowdownProxyProcess(upstream, 0.5) as slow:
            slowed = [stream_times(slow, 20) for _ in range(3)]
        with SlowdownProxyProcess(upstream, 0.0) as same:
            passed = [stream_times(same, 20) for _ in range(3)]
    med = lambda xs, i: sorted(x[i] for x in xs)[1]  # noqa: E731
    assert direct[0][2] == slowed[0][2] == passed[0][2]  # every chunk comes through
    assert med(slowed, 0) / med(direct, 0) == pytest.approx(1.5, abs=0.1)  # TTFT 0.2 s -> 0.3 s
    assert med(slowed, 1) / med(direct, 1) == pytest.approx(1.5, abs=0.1)  # E2E ~0.6 s -> ~0.9 s
    assert med(passed, 1) / med(direct, 1) == pytest.approx(1.0, abs=0.1)  # slowdown 0: the proxy's own cost


def test_other_paths_pass_through_undelayed():
    with StubServerProcess(StubBehavior()) as upstream, SlowdownProxyProcess(upstream, 3.0) as slow:
        t0 = time.monotonic()
        with urllib.request.urlopen(slow + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"]
        assert time.monotonic() - t0 < 1.0


def test_negative_slowdown_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--upstream", "http://127.0.0.1:1", "--slowdown", "-0.1"])
    assert e.value.code == 2 and "must be >= 0" in capsys.readouterr().err


def test_an_injected_point_is_never_a_baseline(tmp_path):
    from pdperf.gate import BaselineError, write_baseline
    from pdperf.report.synthetic import synthetic_point

    p = synthetic_point("cpu-colloc-1xtp1", "w", 4, n=20, tpot_ms=10, ttft_ms=50, output_tokens=8, sigma=0.2, seed=1,
                        hardware_id="cpu-test", flags=["injected_slowdown:0.2"])
    with pytest.raises(BaselineError, match="on purpose is never written as a baseline"):
        write_baseline(tmp_path, [p], allow_flagged=True)
    assert not any(tmp_path.rglob("*.json"))


def test_inject_slowdown_option_is_checked():
    from pdperf.errors import SpecError
    from pdperf.session.options import SessionOptions

    assert SessionOptions(inject_slowdown=0.2).inject_slowdown == 0.2
    with pytest.raises(SpecError, match="--inject-slowdown -1: must be between 0 and 10"):
        SessionOptions(inject_slowdown=-1)
