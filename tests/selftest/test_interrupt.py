"""Ctrl-C in the middle of a sweep: the points already measured stay, the session's files and the
report are written, and a second Ctrl-C ends the run at once.

A test file written here drives the suite's own ``measure`` fixture through one point after
another against the loopback stub (in its own process: the point is the harness, not the
server). The outer test waits for two point files, sends SIGINT, and reads what is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdperf.loadgen.stub_server import StubBehavior, StubServerProcess
from pdperf.results import load_point
from pdperf.specs import ROOT
from pdperf.waiting import poll_until
from tests.selftest.test_bad_input import clean_env, make_tokenizer

pytestmark = pytest.mark.selftest

SWEEP_TEST = '''
"""Written by tests/selftest/test_interrupt.py: points one after another until interrupted."""
import os
from pathlib import Path

import pytest

from pdperf.backends.base import Endpoint
from pdperf.specs import Sweep, Topology, Workload


@pytest.mark.parametrize("c", range(1, 30))
def test_point(measure, c):
    topology = Topology(name="stub", kind="collocated", device="cpu", model="tiny-llama", collocated={"tp": 1})
    endpoint = Endpoint(topology=topology, backend="external", base_url=os.environ["STUB_URL"], model_id="stub-model",
                        tokenizer_path=Path(os.environ["TOK_DIR"]))
    workload = Workload(name="stub-wl", isl=32, osl=8, request_timeout_s=30,
                        sweep=Sweep(kind="concurrency", points=[c], requests_per_point=8))
    measure(endpoint, workload, c, processes=0)
'''


@pytest.fixture(scope="module")
def stub_and_tokenizer(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    # each request streams for ~0.5 s: a point takes seconds, so the interrupt lands mid-sweep
    with StubServerProcess(StubBehavior(ttft_s=0.1, token_interval_s=0.05, prompt_tokens=32)) as url:
        yield url, tok


def start_sweep(tmp_path: Path, stub_and_tokenizer) -> tuple[subprocess.Popen[str], Path]:
    url, tok = stub_and_tokenizer
    test_file = tmp_path / "tests" / "test_sweeping.py"
    test_file.parent.mkdir()
    test_file.write_text(SWEEP_TEST)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(test_file), "-c", str(ROOT / "pytest.ini"),
           f"--rootdir={ROOT}", "-p", "fixtures.options", "-p", "fixtures.session", "-p", "fixtures.reporting",
           f"--run-dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(STUB_URL=url, TOK_DIR=str(tok)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_ctrl_c_as_at_a_terminal)
    return proc, run_dir


def _ctrl_c_as_at_a_terminal() -> None:
    """The child takes SIGINT as a user's Ctrl-C does. Started in the background of a
    non-interactive shell (nohup, `&`, some CI runners) this run inherits SIGINT ignored, and
    Python keeps an ignored SIGINT: the child would then miss the test's Ctrl-C between points."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_points(proc: subprocess.Popen[str], run_dir: Path, n: int) -> None:
    def enough() -> bool | None:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}")
        return True if len(list((run_dir / "points").glob("*.json"))) >= n else None

    poll_until(enough, what=f"{n} points saved", timeout_s=120, interval_s=0.1, max_interval_s=0.5)


def test_ctrl_c_keeps_the_measured_points_and_writes_the_report(tmp_path, stub_and_tokenizer):
    proc, run_dir = start_sweep(tmp_path, stub_and_tokenizer)
    try:
        wait_for_points(proc, run_dir, 2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "INTERNALERROR" not in out, out
    saved = sorted((run_dir / "points").glob("*.json"))
    assert len(saved) >= 2 and not list((run_dir / "points").glob("*.tmp*")), saved  # whole files, no temp file
    for f in saved:
        assert load_point(f).summary.requests_ok == 8  # each finished point whole
    verdicts = json.loads((run_dir / "verdicts.json").read_text())
    assert len([v for v in verdicts if v["outcome"] == "passed"]) >= 2
    assert json.loads((run_dir / "run.json").read_text())["exit_status"] == pytest.ExitCode.INTERRUPTED
    assert (run_dir / "summary.html").exists()


def test_a_second_ctrl_c_ends_the_run_at_once(tmp_path, stub_and_tokenizer):
    proc, run_dir = start_sweep(tmp_path, stub_and_tokenizer)
    try:
        wait_for_points(proc, run_dir, 1)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        proc.communicate(timeout=60)
        ended_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert ended_after < 30, f"two Ctrl-C took {ended_after:.1f} s to end the run"
    assert len(list((run_dir / "points").glob("*.json"))) >= 1  # what was measured before stays
