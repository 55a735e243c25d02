"""What a result records about the machine it ran on (pdperf/environment.py).

The GPU settings come from a stand-in ``nvidia-smi`` on PATH (these machines have no GPU): the
point is the parsing and what is kept, not the tool.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from pdperf import environment
from pdperf.cluster import ClusterShape, NodeInfo

pytestmark = pytest.mark.selftest

ROOT = Path(__file__).resolve().parents[2]

FOUR_H100 = "\n".join(["580.95.05, 700.00, 1980, 2619, Enabled"] * 4) + "\n"


def fake_nvidia_smi(tmp_path: Path, monkeypatch, stdout: str, rc: int = 0) -> None:
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text(f"#!/bin/sh\ncat <<'OUT'\n{stdout}OUT\nexit {rc}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")


def test_gpu_facts_one_value_per_setting(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, FOUR_H100)
    assert environment.gpu_facts() == {"gpu_driver": "580.95.05", "gpu_power_limit_w": "700.00",
                                       "gpu_max_sm_clock_mhz": "1980", "gpu_max_mem_clock_mhz": "2619",
                                       "gpu_persistence_mode": "Enabled"}


def test_gpu_facts_show_gpus_that_differ_and_drop_what_is_not_reported(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "580.95.05, 700.00, 1980, 2619, [N/A]\n"
                                           "580.95.05, 500.00, 1980, 2619, [N/A]\n")
    facts = environment.gpu_facts()
    assert facts["gpu_power_limit_w"] == "500.00, 700.00"
    assert "gpu_persistence_mode" not in facts


@pytest.mark.parametrize("stdout,rc", [("", 9), ("NVIDIA-SMI has failed\n", 0)], ids=["fails", "no-rows"])
def test_gpu_facts_empty_where_nvidia_smi_says_nothing(tmp_path, monkeypatch, stdout, rc):
    fake_nvidia_smi(tmp_path, monkeypatch, stdout, rc)
    assert environment.gpu_facts() == {}


def test_gpu_facts_empty_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert environment.gpu_facts() == {}


def test_gpu_runs_record_the_host_and_its_gpu_settings(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, FOUR_H100)
    shape = ClusterShape(nodes=[NodeInfo("n0", "10.0.0.1", gpus=4, gpu_model="H100", is_head=True)])
    env = environment.fingerprint(shape, backend="ray", root=tmp_path)
    assert env["host"] and env["gpu_driver"] == "580.95.05" and env["gpu_max_sm_clock_mhz"] == "1980"


def test_cpu_runs_record_neither(tmp_path, monkeypatch):
    """CI's container names change every run: a host key would be noted at every gate."""
    fake_nvidia_smi(tmp_path, monkeypatch, FOUR_H100)
    env = environment.fingerprint(ClusterShape(nodes=[NodeInfo("n0", "10.0.0.1", is_head=True)]),
                                  backend="ray", root=tmp_path)
    assert "host" not in env and not any(k.startswith("gpu_driver") for k in env)


def test_git_sha_from_the_environment_wins(monkeypatch, tmp_path):
    # the GPU test machines' copy of .git lagged the tree: the session script passes the staged commit as
    # PDPERF_GIT_SHA, which the session's options read (pdperf.session.options.EnvSwitches) and pass in
    monkeypatch.setenv("PDPERF_GIT_SHA", "0000000000ff")  # never read here: only what is passed counts
    assert environment.git_sha(tmp_path, "355fef3abcde\n") == "355fef3abcde"
    assert environment.git_sha(tmp_path) is None  # no repository there


@pytest.mark.parametrize("present, says", [
    ((), "no chunk marker"),
    ((1, 2), "chunk(s) c00 missing"),
    ((0, 2), "chunk(s) c01 missing"),
])
def test_gpu_install_names_the_chunks_that_did_not_arrive(tmp_path, present, says):
    """The ninth GPU session's first copy call found no machine: c00 never arrived and install.sh
    failed on an import; tools/gpu-testmachines/install.sh names the missing chunk and installs nothing."""
    for i in present:
        (tmp_path / f"pdperf-chunk-{i:02d}-of-03").write_text("")
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu-testmachines" / "install.sh")], capture_output=True, text=True,
                         env={**os.environ, "GPU_STAGE_DIR": str(tmp_path)}, timeout=30)
    assert out.returncode == 3 and says in out.stderr, out.stderr
    assert not (tmp_path / "pdperf-installed").exists()
