"""A handler bound to pytest's capture file, then an interrupted run whose session teardown logs
(fixtures/logstreams.py): no "--- Logging error ---" with the suite's plugin."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.logstreams import release_closed_streams

pytestmark = pytest.mark.selftest

ROOT = Path(__file__).resolve().parents[2]

# As on the GPU machine: the first deployment imports ray.serve.llm, which gives the root logger a
# StreamHandler() on the sys.stderr of that moment (pytest's capture file); the call budget's
# SIGINT interrupts the run; the pool's teardown then warns about kept deployments.
CONFTEST = '''
import logging, pytest

@pytest.fixture(scope="session")
def pool():
    logging.getLogger().addHandler(logging.StreamHandler())
    yield
    logging.getLogger("pdperf.backends.ray_serve").warning("topology %s: left running (--keep-deployments)", "t")
'''


def _interrupted_run(tmp_path: Path, *plugin: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_interrupted.py").write_text("def test_interrupted(pool):\n    raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "log_cli=true",
                           "-o", "log_cli_level=WARNING", *plugin], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_teardown_warning_after_interrupt_reaches_no_closed_stream(tmp_path):
    without = _interrupted_run(tmp_path)
    assert "--- Logging error ---" in without.stderr and "I/O operation on closed file" in without.stderr, (
        "the reproduction no longer fails without the fix:\n" + without.stdout + without.stderr)

    fixed = _interrupted_run(tmp_path, "-p", "fixtures.logstreams")
    out = fixed.stdout + fixed.stderr
    assert fixed.returncode == 2, out  # interrupted
    assert "Logging error" not in out and "closed file" not in out, out
    assert "left running (--keep-deployments)" in fixed.stdout, out  # live logging still shows it


class _Closed:
    closed = True

    def write(self, text: str) -> None:
        raise ValueError("I/O operation on closed file.")

    def flush(self) -> None:
        raise ValueError("I/O operation on closed file.")


def test_root_handler_on_a_closed_stream_is_dropped_others_are_repointed():
    root, lib = logging.getLogger(), logging.getLogger("pdperf.selftest.library")
    dead_root, dead_lib = logging.StreamHandler(_Closed()), logging.StreamHandler(_Closed())
    live = logging.StreamHandler(sys.stderr)
    root.addHandler(dead_root)
    lib.addHandler(dead_lib)
    lib.addHandler(live)
    try:
        changed = release_closed_streams()
        assert "root: StreamHandler" in changed and changed.count("pdperf.selftest.library: StreamHandler") == 1
        assert dead_root not in root.handlers
        assert dead_lib in lib.handlers and dead_lib.stream is sys.stderr
        assert live.stream is sys.stderr
    finally:
        root.removeHandler(dead_root)
        lib.removeHandler(dead_lib)
        lib.removeHandler(live)
