"""The client under load: 2000 concurrent streams, and the file-descriptor limit they run into.

Every in-flight stream holds a socket, and a process may open only RLIMIT_NOFILE files: 1024
soft by default on many Linux distributions, where c2000 used to end with the worker dying on
EMFILE while importing a module ("load worker 0 exited with None"), or with ~1000 connection
errors. ``run_point`` now raises the soft limit to the hard one when a point needs more, and
refuses the point before any request when even the hard limit is too low
(``pdperf.loadgen.runner.ensure_socket_limit``).

The load test runs the client in a subprocess whose soft limit is set to 1024 (the hard limit
left as it is), against the stub in a process of its own (its soft limit raised to 4096 for
it: the stub holds the server's end of every socket). 2000 requests at concurrency 2000, 8
tokens each, the stub holding each stream 2 s before its first token so that every request
is sent before any ends. Measured on a shared 2-core container: one client process keeps up
(client CPU 1.0-1.4 s for the point, no errors, the last request sent 2.4-2.7 s before the
first one ended; two processes were no faster, 9.1 s against 8.7 s, as the stub and the client
share the two cores); run_point takes ~9 s (of it ~2 s building 2000 prompts and starting the
worker), the test 10-13 s wall. The point is flagged ``client_loop_lag``: 2000 connects at
once keep the loop busy, which a real point at c2000 would want to know, and this one does not
judge.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdperf.errors import PdperfError
from pdperf.loadgen import runner
from pdperf.loadgen.client import PreparedRequest
from pdperf.loadgen.runner import ensure_socket_limit, plan_shares
from pdperf.loadgen.stub_server import StubBehavior, StubServerProcess
from pdperf.specs import ROOT
from tests.selftest.test_bad_input import clean_env, make_tokenizer

pytestmark = pytest.mark.selftest

CONCURRENCY = 2000
STUB_FILES = 4096  # the stub's end of 2000 sockets, and its own

CLIENT = '''
"""Written by tests/selftest/test_client_load.py: one closed-loop point, its outcome as JSON."""
import json
import resource
import sys
import time
from pathlib import Path

from pdperf.errors import PdperfError
from pdperf.loadgen.runner import run_point
from pdperf.specs import Sweep, Workload


def main() -> int:
    url, tok, concurrency, processes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    workload = Workload(name="client-load", isl=32, osl=8, request_timeout_s=60,
                        sweep=Sweep(kind="concurrency", points=[concurrency], requests_per_point=concurrency))
    t0 = time.perf_counter()
    try:
        r = run_point(base_url=url, model="stub-model", tokenizer_path=tok, workload=workload, point=concurrency,
                      topology="stub", gpus=0, processes=processes, reset_cache=False, telemetry_sampling=False)
    except PdperfError as e:
        print(json.dumps({"error": str(e), "limits_before": before}))
        return 2
    measured = [x for x in r.records if not x.warmup]
    print(json.dumps({
        "limits_before": before, "limits_after": resource.getrlimit(resource.RLIMIT_NOFILE),
        "point_s": time.perf_counter() - t0, "requests": r.summary.requests, "ok": r.summary.requests_ok,
        "errors": r.summary.errors, "examples": r.summary.error_examples, "flags": r.flags,
        "last_sent_s": max(x.sent_s for x in measured), "first_end_s": min(x.end_s or 0.0 for x in measured),
        "client_cpu_s": r.client.worker_cpu_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServerProcess]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < STUB_FILES:
        pytest.skip(f"the stub needs {STUB_FILES} open files for {CONCURRENCY} streams; the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, STUB_FILES), hard))
    server = StubServerProcess(StubBehavior(ttft_s=2.0, token_interval_s=0.01, prompt_tokens=32))
    try:
        server.__enter__()  # the stub's process inherits the raised limit; this one goes back to its own
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def client_script(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("client-load")
    (base / "client.py").write_text(CLIENT)
    return base / "client.py", make_tokenizer(base / "tok")


def run_client(script: tuple[Path, Path], url: str, *, soft: int, hard: int, processes: int = 1,
               timeout_s: float = 120.0) -> tuple[int, dict, float]:
    """The client in a process of its own, RLIMIT_NOFILE set to (soft, hard) before it starts."""
    path, tok = script

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path), url, str(tok), str(CONCURRENCY), str(processes)], cwd=ROOT,
                          env=clean_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=timeout_s,
                          preexec_fn=limit)
    wall_s = time.perf_counter() - t0
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), wall_s


def test_2000_concurrent_streams_from_a_1024_soft_limit(stub, client_script):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < CONCURRENCY + 200:
        pytest.skip(f"{CONCURRENCY} streams need more than this machine's hard limit of {hard} open files")
    before = stub.stats()
    code, out, wall_s = run_client(client_script, stub.url, soft=1024, hard=hard)
    assert code == 0, out
    assert out["limits_before"] == [1024, hard] and out["limits_after"] == [hard, hard]  # raised for the point
    assert out["requests"] == CONCURRENCY and out["ok"] == CONCURRENCY, out
    assert out["errors"] == {} and not any(f.startswith("requests_failed") for f in out["flags"]), out
    assert out["last_sent_s"] < out["first_end_s"], out  # every request was sent before any ended: 2000 at once
    after = stub.stats()
    assert after["completed"] - before["completed"] == CONCURRENCY
    assert wall_s < 120


def test_a_hard_limit_too_low_refuses_the_point_before_any_request(stub, client_script):
    before = stub.stats()
    code, out, _ = run_client(client_script, stub.url, soft=1024, hard=1024)
    assert code == 2, out
    assert re.fullmatch(r"concurrency 2000 needs ~20\d\d sockets; this process may open 1024 \(ulimit -n, its hard "
                        r"limit\); raise it with `ulimit -n 4096` before starting \(above the hard limit: as root, or "
                        r"in /etc/security/limits.conf\)", out["error"]), out["error"]
    assert stub.stats()["requests"] == before["requests"]  # nothing was sent


# -- the check itself, on stated limits --------------------------------------------------------------

def _shares(kind: str, point: float, processes: int, n: int, max_concurrency: int | None = None):
    reqs = [PreparedRequest(index=i, body=b"{}", input_tokens=1, output_tokens=1) for i in range(n)]
    return plan_shares(base_url="http://127.0.0.1:1", api="completions", timeout_s=5, kind=kind, point=point,
                       processes=processes, warmup=[], measured=reqs, max_concurrency=max_concurrency)


@pytest.fixture
def limits(monkeypatch):
    """RLIMIT_NOFILE as the check sees it, and the soft limits it sets (this process's stay as they are)."""
    state = {"limit": (1024, 4096), "set": []}
    monkeypatch.setattr(runner.resource, "getrlimit", lambda which: state["limit"])
    monkeypatch.setattr(runner.resource, "setrlimit", lambda which, value: state["set"].append(value))
    monkeypatch.setattr(runner, "_open_fds", lambda: 36)  # 36 + FD_HEADROOM 64 = 100 besides the streams
    return state


def test_limit_left_alone_when_the_soft_one_suffices(limits):
    ensure_socket_limit(_shares("concurrency", 900, 1, 900), point=900)
    assert limits["set"] == []


def test_soft_limit_raised_to_the_hard_one(limits):
    ensure_socket_limit(_shares("concurrency", 2000, 1, 2000), point=2000)
    assert limits["set"] == [(4096, 4096)]


def test_each_process_needs_its_share_only(limits):
    ensure_socket_limit(_shares("concurrency", 4000, 2, 4000), point=4000)  # 2000 + 100 a process: raised
    assert limits["set"] == [(4096, 4096)]
    with pytest.raises(PdperfError) as e:
        ensure_socket_limit(_shares("concurrency", 8000, 2, 8000), point=8000)
    assert str(e.value).startswith("concurrency 8000 needs ~4100 sockets in each of 2 load processes; this process "
                                   "may open 4096 (ulimit -n, its hard limit); raise it with `ulimit -n 8192`")


def test_open_loop_with_a_cap_is_refused_and_without_one_only_raised(limits):
    with pytest.raises(PdperfError, match=r"^rate 50 req/s capped at 5000 in flight needs ~5100 sockets"):
        ensure_socket_limit(_shares("rate", 50, 1, 6000, max_concurrency=5000), point=50)
    assert limits["set"] == []
    ensure_socket_limit(_shares("rate", 50, 1, 6000), point=50)  # 6000 requests bound its peak, nothing more
    assert limits["set"] == [(4096, 4096)]
