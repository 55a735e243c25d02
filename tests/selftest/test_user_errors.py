"""What a user sees after a mistake: one clear line naming the fix, never a Python traceback.

These run pytest itself in a subprocess from the repo root, as a user would. Each stops in
``pytest_configure`` (before any engine starts), so they take seconds; the bad --ray-address
case dials a port where nothing listens and must fail fast too, not after Ray's retries.
A bad YAML file cannot be planted in the repo's own folders, so that case is a unit test of
``all_topologies`` / ``all_workloads`` on a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pdperf.errors import SpecError
from pdperf.specs import ROOT, all_topologies, all_workloads
from pdperf.waiting import free_port

pytestmark = pytest.mark.selftest

USAGE_ERROR = 4  # pytest.ExitCode.USAGE_ERROR


def run_pytest(tmp_path, *args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    cmd = [sys.executable, "-m", "pytest", "tests/smoke", "-p", "no:cacheprovider", f"--run-dir={tmp_path / 'run'}",
           *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(cmd)}` still running after {timeout_s:g} s; output so far:\n"
                    f"{(e.stdout or b'')[-2000:]!r}\n{(e.stderr or b'')[-2000:]!r}", pytrace=False)
    return proc.returncode, proc.stdout + proc.stderr


def the_error_line(output: str) -> str:
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, f"expected one ERROR line:\n{output}"
    return errors[0]


def test_unknown_topology(tmp_path):
    code, output = run_pytest(tmp_path, "--topology=no-such-topology")
    assert code == USAGE_ERROR, output
    line = the_error_line(output)
    assert "--topology no-such-topology: no such topology" in line
    assert "known:" in line and "cpu-pd-1p1-1d1" in line and "colloc-1xtp1" in line


def test_external_backend_without_url(tmp_path):
    code, output = run_pytest(tmp_path, "--backend=external")
    assert code == USAGE_ERROR, output
    assert "--external-url" in the_error_line(output)


def test_unreachable_ray_address(tmp_path):
    """Nothing listens on the port: the run ends in seconds with a message naming --ray-address."""
    address = f"127.0.0.1:{free_port()}"
    code, output = run_pytest(tmp_path, f"--ray-address={address}", "-m", "smoke", "-k", "cpu-colloc",
                              "--deploy-timeout=30", timeout_s=120)
    assert code == USAGE_ERROR, output
    line = the_error_line(output)
    assert f"--ray-address {address}: cannot connect" in line
    assert "omit --ray-address" in line


# -- bad YAML in a topologies / workloads folder -----------------------------------------------

def test_all_topologies_names_the_bad_file_and_key(tmp_path):
    good = {"kind": "collocated", "device": "cpu", "model": "tiny-llama", "collocated": {"tp": 1}}
    (tmp_path / "a-good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "b-bad.yaml").write_text(yaml.safe_dump({**good, "replica_count": 2}))
    with pytest.raises(SpecError) as e:
        all_topologies(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "b-bad.yaml") in msg
    assert "replica_count: unknown key" in msg


def test_all_workloads_names_the_file_with_broken_yaml(tmp_path):
    (tmp_path / "broken.yaml").write_text("isl: 10\nsweep: {kind: concurrency, points: [1\n")
    with pytest.raises(SpecError) as e:
        all_workloads(tmp_path)
    assert str(tmp_path / "broken.yaml") in str(e.value) and "not valid YAML" in str(e.value)


def test_xdist_without_ray_address_is_refused(tmp_path):
    code, output = run_pytest(tmp_path, "-n", "2", "-m", "smoke")
    assert code == USAGE_ERROR, output
    line = the_error_line(output)
    assert "-n 2" in line and "--ray-address auto" in line and "--dist loadgroup" in line
