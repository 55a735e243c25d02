"""``pdperf diagnose`` on fake snapshots: what a stuck start-up report must say."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdperf.diagnose import render, replica_logs
from pdperf.specs import ROOT
from pdperf.waiting import free_port

pytestmark = pytest.mark.selftest

STUCK = {
    "resources": {"total": {"CPU": 256.0, "GPU": 4.0}, "available": {"CPU": 240.0, "GPU": 0.0}},
    "serve": {"colloc-2xtp1": {"status": "DEPLOYING", "message": "", "deployments": {
        "LLMServer:colloc-2xtp1": {"status": "UPDATING", "replicas": {"STARTING": 2},
                                   "message": "has 2 replicas that have taken more than 30s to initialize."}}}},
    "placement_groups": [
        {"name": "SERVE_REPLICA::pd#LLMServer#ab", "state": "PENDING", "bundles": {0: {"CPU": 2.0, "GPU": 1.0}},
         "strategy": "STRICT_PACK"},
        {"name": "SERVE_REPLICA::colloc-2xtp1#LLMServer#cd", "state": "CREATED", "bundles": {0: {"GPU": 1.0}}}],
    "replicas": [{"name": "ServeReplica:colloc-2xtp1:LLMServer", "state": "ALIVE", "pid": 42, "restarts": 1,
                  "death": ""}],
    "replica_logs": {"ServeReplica:colloc-2xtp1:LLMServer (pid 42, ALIVE)": ["Compiling a graph for shape 8"]},
    "controller_log": ["WARNING ... taken more than 30s to initialize."],
    "engine_processes": ["pid 43 VLLM::EngineCore cpu 310 s"],
    "gpus": ["0, 70000 MiB, 81559 MiB, 0 %"],
    "logs_dir": "/tmp/ray/session_latest/logs",
}


def test_render_says_where_a_stuck_start_up_stands():
    text = render(STUCK)
    assert "GPU: 4 / 0" in text
    assert "colloc-2xtp1: DEPLOYING" in text and "UPDATING replicas {'STARTING': 2}" in text
    assert "SERVE_REPLICA::pd#LLMServer#ab: PENDING bundles [{'CPU': 2.0, 'GPU': 1.0}] STRICT_PACK" in text
    assert "colloc-2xtp1#LLMServer#cd" not in text  # placed groups are not listed
    assert "restarts 1" in text and "VLLM::EngineCore cpu 310 s" in text
    assert "  Compiling a graph for shape 8" in text


def test_render_survives_failed_parts():
    text = render({"resources": {"error": "RaySystemError: gone"}, "serve": {"error": "TimeoutError: slow"},
                   "engine_processes": {"error": "ImportError: psutil"}})
    assert "RaySystemError: gone" in text and "TimeoutError: slow" in text and "ImportError: psutil" in text


def test_replica_logs_pick_engine_replicas_by_pid(tmp_path):
    (tmp_path / "worker-aa-01000000-42.err").write_text("old\n\nloading\ncompiling\n")
    (tmp_path / "worker-bb-01000000-43.err").write_text("ingress line\n")
    actors = [{"ActorClassName": "ServeReplica:a:LLMServer:a", "Pid": 42, "State": "ALIVE"},
              {"ActorClassName": "ServeReplica:a:OpenAiIngress", "Pid": 43, "State": "ALIVE"},
              {"ActorClassName": "ServeReplica:a:LLMServer:b", "Pid": 44, "State": "ALIVE"}]  # no log file
    logs = replica_logs(tmp_path, actors, 2)
    assert logs == {"ServeReplica:a:LLMServer:a (pid 42, ALIVE)": ["loading", "compiling"]}


def test_first_errors_find_the_engines_root_cause_above_the_repeats(tmp_path):
    """4x H100: the diagnosis's last 60 lines held only "EngineCore encountered an issue" repeats."""
    from pdperf.diagnose import first_errors, render

    (tmp_path / "worker-aa-01000000-42.err").write_text(
        "INFO loading\n(EngineCore pid=7) ERROR 11-27 [core.py:1330] EngineCore failed to start.\n"
        "(EngineCore pid=7) ERROR 11-27 [core.py:1330] Traceback (most recent call last):\n"
        "(EngineCore pid=7) ERROR 11-27 [core.py:1330] torch.distributed.DistNetworkError: port: 100 EADDRINUSE\n"
        + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n" * 50)
    (tmp_path / "worker-bb-01000000-43.err").write_text("INFO all fine\n")
    found = first_errors(tmp_path, n=3)
    assert list(found) == ["worker-aa-01000000-42.err"]
    assert found["worker-aa-01000000-42.err"][0].endswith("EngineCore failed to start.")
    assert "EADDRINUSE" in found["worker-aa-01000000-42.err"][2]
    assert "== first error block of worker-aa-01000000-42.err" in render({"first_errors": found})


def test_cli_unreachable_address_is_one_error_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pdperf.cli", "diagnose", "--ray-address", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.startswith("error: --ray-address 127.0.0.1:") and "Traceback" not in out.stderr
    assert "ray status" in out.stderr


def test_progress_keeps_serve_messages_short():
    from pdperf.backends.ray_serve import _short_message

    msg = ("Deployment 'Prefill:pd' in application 'pd' has 1 replicas that have taken more than 30s to be "
           "scheduled. This may be due to waiting for the cluster to auto-scale. Resources required: ...")
    assert _short_message(msg) == "has 1 replicas that have taken more than 30s to be scheduled"
    assert _short_message(None) == "" and _short_message("a\n  b") == "a b"
    assert len(_short_message("x" * 500)) == 160


def test_waiting_start_up_names_the_applications_that_hold_resources():
    """The ninth GPU session deployed colloc-1xtp2 (2 GPUs) beside a kept PD app and its reference
    (3 of 4 GPUs): the wait said only that the cluster lacked resources, for 360 s."""
    from pdperf.backends.ray_serve import _pending_note

    pending = [{"bundles": {"0": {"CPU": 2.0, "GPU": 1.0}, "1": {"CPU": 1.0, "GPU": 1.0}}, "strategy": "STRICT_PACK"}]
    alone = _pending_note(pending, [])
    assert alone.startswith("1 placement group(s) not yet placed, e.g. bundles [{'CPU': 2.0, 'GPU': 1.0}")
    assert "(STRICT_PACK)" in alone and "other Serve" not in alone
    beside = _pending_note(pending, ["colloc-1xtp1", "pd-1p1-1d1-pack"])
    assert "other Serve applications hold theirs: colloc-1xtp1, pd-1p1-1d1-pack" in beside
    assert "`serve delete NAME`" in beside


def test_a_replica_never_scheduled_has_no_log_to_fetch():
    """Ray's state API refused pid 0 with a pydantic error (ninth GPU session's diagnosis)."""
    from pdperf.backends.ray_serve import _actor_log_tail

    out = _actor_log_tail({"Pid": 0, "State": "PENDING_CREATION", "Address": {"NodeID": "n"}}, 5)
    assert out == "(no log: the replica has no process yet, state PENDING_CREATION)"
