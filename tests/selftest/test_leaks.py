"""The leak check and ``pdperf cleanup`` without a serving stack: the diff between two snapshots,
the one-line message, which processes are orphans, and the check wired into a pytest run.

Snapshots are built by hand (fakes of what psutil, nvidia-smi and Ray report), so each rule is
tried on its own: what existed before is no leak, a kept application is expected, a session that
deployed nothing does not count another session's engines. The real processes are exercised by
one child process that this test starts and leaves running, found by the check and removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from pdperf import leaks
from pdperf.cli import main as pdperf_main
from pdperf.leaks import (
    ActorInfo,
    ClusterState,
    GpuApp,
    Leftovers,
    PlacementGroupInfo,
    ProcessInfo,
    Snapshot,
    classify,
    diff,
    orphans,
)
from pdperf.specs import ROOT
from pdperf.waiting import poll_until
from tests.selftest.test_bad_input import clean_env

pytestmark = pytest.mark.selftest


def proc(pid: int, kind: leaks.ProcessKind = "engine", command: str = "VLLM::EngineCore", *, ppid: int = 1000,
         descendant: bool = False) -> ProcessInfo:
    return ProcessInfo(pid, 100.0 + pid, kind, command, ppid, descendant=descendant)


def snap(*procs: ProcessInfo, gpu: tuple[GpuApp, ...] | None = (), cluster: ClusterState | None = None) -> Snapshot:
    return Snapshot(tuple(procs), gpu, None if gpu is not None else "GPU memory not checked: no nvidia-smi", cluster)


# -- classification -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "cmdline", "kind"), [
    ("VLLM::EngineCore", ["VLLM::EngineCore"], "engine"),
    ("python3", ["VLLM::Worker_TP0"], "engine"),
    ("vllm", ["/x/.venv/bin/python", "/x/.venv/bin/vllm", "serve", "/models/tiny"], "vllm serve"),
    ("python", ["python", "-m", "vllm.entrypoints.cli.main", "serve", "m"], "vllm serve"),
    ("ray::ServeRepli", ["ray::ServeReplica:cpu-colloc-1xtp1:LLMServer"], "ray"),
    ("raylet", ["/x/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"], "ray"),
    ("gcs_server", ["/x/gcs_server", "--session-dir=/tmp/ray/session_1"], "ray"),
    ("python", ["python", "-m", "pdperf.backends.pd_proxy", "--port", "1"], "pdperf"),
    ("python", ["python", "-m", "pytest", "-m", "smoke"], None),
    ("bash", ["bash", "-c", "vllm serve"], None),  # a shell whose string mentions it is not the server
])
def test_classify(name, cmdline, kind):
    assert classify(name, cmdline) == kind


# -- the diff -----------------------------------------------------------------------------------------
def test_what_existed_before_is_no_leak():
    before = snap(proc(10), proc(11, "vllm serve", "vllm serve m"))
    after = snap(proc(10), proc(11, "vllm serve", "vllm serve m"), proc(12), proc(13))
    found = diff(before, after, deployed=True)
    assert [p.pid for p in found.processes] == [12, 13]


def test_a_reused_pid_is_a_new_process():
    before = snap(proc(10))
    after = snap(ProcessInfo(10, 999.0, "engine", "VLLM::EngineCore", 1))
    assert [p.pid for p in diff(before, after, deployed=True).processes] == [10]


def test_a_session_that_deployed_nothing_counts_only_its_own_descendants():
    """Another session's engines that started meanwhile (a real-stack run beside a selftest run)
    are not this run's; its own children still are."""
    after = snap(proc(20), proc(21, "pdperf", "python -m pdperf.backends.pd_proxy", descendant=True))
    found = diff(snap(), after, deployed=False)
    assert [p.pid for p in found.processes] == [21]
    assert [p.pid for p in diff(snap(), after, deployed=True).processes] == [20, 21]


def test_gpu_memory_of_new_processes_only_and_the_reason_when_unchecked():
    before = snap(gpu=(GpuApp(5, "other", 1000),))
    after = snap(gpu=(GpuApp(5, "other", 1000), GpuApp(30, "VLLM::EngineCore", 70000)))
    assert diff(before, after, deployed=True).gpu_apps == (GpuApp(30, "VLLM::EngineCore", 70000),)
    unchecked = diff(snap(gpu=None), snap(gpu=None), deployed=True)
    assert unchecked.empty
    assert "GPU memory not checked: no nvidia-smi" in unchecked.not_checked


def test_parse_compute_apps():
    text = "1234, VLLM::EngineCore, 70123\n5678, /usr/bin/python3, [N/A]\nNo running processes found\n"
    assert leaks.parse_compute_apps(text) == (GpuApp(1234, "VLLM::EngineCore", 70123),
                                              GpuApp(5678, "/usr/bin/python3", None))


def test_gpu_apps_without_nvidia_smi_says_why():
    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    assert leaks.gpu_apps(run=missing) == (None, "GPU memory not checked: no nvidia-smi on this machine")


CONTROLLER = ActorInfo("c1", "ServeController", 50, "01")
PROXY = ActorInfo("p1", "ProxyActor", 51, "01")


def test_cluster_only_what_the_session_made_counts_and_kept_apps_are_expected():
    before = ClusterState(("theirs",), (CONTROLLER, ActorInfo("t1", "ServeReplica:theirs:LLMServer", 60, "01")),
                          (PlacementGroupInfo("pg0", "SERVE_REPLICA::theirs#LLMServer#a", "CREATED"),))
    after = ClusterState(
        ("theirs", "kept-topo", "cpu-pd-1p1-1d1", "other-worker-topo"),
        (CONTROLLER, PROXY,
         ActorInfo("t2", "ServeReplica:theirs:LLMServer", 61, "01"),  # their replica, restarted: still theirs
         ActorInfo("k1", "ServeReplica:kept-topo:LLMServer", 62, "01"),
         ActorInfo("l1", "ServeReplica:cpu-pd-1p1-1d1:PDDecodeServer", 63, "01"),  # counted under its app
         ActorInfo("g1", "ServeReplica:gone-topo:LLMServer", 66, "01"),  # its app deleted, the replica not
         ActorInfo("w1", "ServeReplica:other-worker-topo:LLMServer", 67, "01"),  # another session's
         ActorInfo("d1", "MyDetached", 64, "09", detached=True),  # made by this driver, outlives it
         ActorInfo("d2", "TheirDetached", 68, "07", detached=True),  # another driver's
         ActorInfo("own", "Helper", 65, "09")),  # this driver's, not detached: ends with its disconnect
        (PlacementGroupInfo("pg0", "SERVE_REPLICA::theirs#LLMServer#a", "CREATED"),
         PlacementGroupInfo("pg1", "SERVE_REPLICA::kept-topo#LLMServer#b", "CREATED"),
         PlacementGroupInfo("pg2", "SERVE_REPLICA::cpu-pd-1p1-1d1#PDDecodeServer#c", "CREATED"),
         PlacementGroupInfo("pg3", "SERVE_REPLICA::other-worker-topo#LLMServer#d", "CREATED")))
    found = diff(snap(cluster=before), snap(cluster=after), deployed=False, kept=["kept-topo"], own_job_id="09",
                 own_apps=["kept-topo", "cpu-pd-1p1-1d1", "gone-topo", "theirs"])
    assert found.serve_apps == ("cpu-pd-1p1-1d1",)
    assert [a.actor_id for a in found.actors] == ["g1", "d1"]
    assert [p.pg_id for p in found.placement_groups] == ["pg2"]
    assert found.expected == ("Serve app 'kept-topo' (--keep-deployments)",)


def test_a_local_head_says_its_cluster_was_not_listed():
    found = diff(snap(), snap(), deployed=True)
    assert found.empty
    assert any("no cluster of --ray-address" in n for n in found.not_checked)


# -- the message --------------------------------------------------------------------------------------
def test_message_first_line_names_everything():
    found = Leftovers(processes=(proc(123), proc(456), ProcessInfo(77, 1.0, "vllm serve", "vllm serve /m --port 9",
                                                                   1, ports=(9,))),
                      serve_apps=("cpu-pd-1p1-1d1",), gpu_apps=(GpuApp(123, "VLLM::EngineCore", 500),),
                      placement_groups=(PlacementGroupInfo("pgx", "", "CREATED"),))
    first, *rest = found.message().splitlines()
    assert first == ("leftovers after the run: 2 engine processes (pids 123, 456: VLLM::EngineCore), "
                     "1 vllm serve process (pid 77: vllm serve /m --port 9), "
                     "GPU memory held by 1 process (pids 123: 500 MiB), Serve app 'cpu-pd-1p1-1d1', "
                     "1 placement group (pgx); `pdperf cleanup` removes them")
    assert "  vllm serve process pid 77 (vllm serve /m --port 9, listening on 9)" in rest
    assert json.loads(json.dumps(found.to_dict()))["clean"] is False
    assert Leftovers().to_dict()["clean"] is True


def test_settle_waits_for_processes_to_exit():
    """Teardown's engines exit a moment after the head is down: the check polls, it does not fail at once."""
    states = iter([snap(proc(1)), snap(proc(1)), snap()])
    found = leaks.settle(snap(), lambda: next(states), deployed=True, timeout_s=10)
    assert found.processes == ()


def test_settle_gives_up_under_its_deadline():
    found = leaks.settle(snap(), lambda: snap(proc(999_999)), deployed=True, timeout_s=0.2)
    assert [p.pid for p in found.processes] == [999_999]


# -- orphans and cleanup ------------------------------------------------------------------------------
def test_orphans_are_processes_init_adopted_but_never_a_ray_head():
    procs = [proc(1, ppid=1), proc(2, ppid=500),  # an engine re-parented to init; one under a live replica
             proc(3, "ray", "ray::ServeReplica:x:LLMServer", ppid=1),
             proc(4, "ray", "/x/raylet --head", ppid=1), proc(5, "ray", "/x/gcs_server", ppid=1),  # `ray start`
             proc(6, "vllm serve", "vllm serve m", ppid=1), proc(7, "pdperf", "python -m pdperf.inject", ppid=1)]
    assert [p.pid for p in orphans(procs)] == [1, 3, 6, 7]


def test_suite_apps_are_those_named_after_its_topologies():
    assert leaks.suite_apps(["cpu-pd-1p1-1d1", "their-app", "cpu-colloc-1xtp1"],
                            ["cpu-colloc-1xtp1", "cpu-pd-1p1-1d1", "colloc-1xtp1"]) == ("cpu-colloc-1xtp1",
                                                                                         "cpu-pd-1p1-1d1")


def start_orphan() -> int:
    """A process named as a vLLM engine, whose parent has exited: what a killed session leaves."""
    code = "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(600)"
    try:
        import setproctitle  # noqa: F401
    except ImportError:
        pytest.skip("setproctitle is not installed (vLLM installs it)")
    spawn = ("import subprocess, sys; "
             f"p = subprocess.Popen([sys.executable, '-c', {code!r}], start_new_session=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    out = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    poll_until(lambda: True if any(p.pid == pid for p in orphans(leaks.list_processes())) else None,
               what=f"pid {pid} to be an orphaned engine", timeout_s=30)
    return pid


def test_cleanup_removes_an_orphaned_engine(capsys):
    pid = start_orphan()
    try:
        assert pdperf_main(["cleanup", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"would remove engine process pid {pid} (VLLM::EngineCore)" in out
        assert any(p.pid == pid for p in orphans(leaks.list_processes()))  # a dry run removes nothing
        assert pdperf_main(["cleanup"]) == 0
        assert f"removed engine process pid {pid} (VLLM::EngineCore)" in capsys.readouterr().out
        assert not any(p.pid == pid for p in leaks.list_processes())
        assert pdperf_main(["cleanup", "--dry-run"]) == 0
        assert "nothing left behind" in capsys.readouterr().out
    finally:
        leaks.remove_processes([p for p in leaks.list_processes() if p.pid == pid])


def test_cleanup_user_mistakes_are_one_line(tmp_path):
    for args, expected in [(["--topologies-dir", str(tmp_path / "nope")], "--topologies-dir"),
                           (["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: nothing answers")]:
        proc = subprocess.run([sys.executable, "-m", "pdperf.cli", "cleanup", "--dry-run", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=clean_env())
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: {expected}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# -- the check in a pytest run ------------------------------------------------------------------------
LEAKY_TEST = '''
"""Written by tests/selftest/test_leaks.py: one test leaves a child that looks like a vLLM engine."""
import subprocess
import sys

import psutil

from pdperf.waiting import poll_until


def test_leaves_an_engine():
    code = "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(600)"
    child = psutil.Process(subprocess.Popen([sys.executable, "-c", code]).pid)
    # Right after exec the command line can read empty: wait for the retitled one.
    poll_until(lambda: True if child.cmdline()[:1] and child.cmdline()[0].startswith("VLLM::") else None,
               what="the title", timeout_s=30)


def test_after_it():
    pass
'''


def run_pytest(test_file, run_dir) -> subprocess.CompletedProcess[str]:
    """pytest on a test file outside the repo, with the suite's plugins (the repo's conftest is not its)."""
    plugins = [a for name in ("options", "session", "reporting", "leaks") for a in ("-p", f"fixtures.{name}")]
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(test_file), "-c",
                           str(ROOT / "pytest.ini"), f"--rootdir={ROOT}", *plugins, f"--run-dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())


def test_a_run_that_leaves_an_engine_fails_its_last_test(tmp_path):
    pytest.importorskip("setproctitle")
    test_file = tmp_path / "test_leaky.py"
    test_file.write_text(textwrap.dedent(LEAKY_TEST))
    run_dir = tmp_path / "run"
    proc = run_pytest(test_file, run_dir)
    outcome = json.loads((run_dir / "leftovers.json").read_text())
    try:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "2 passed, 1 error" in out, out
        assert "ERROR at teardown of test_after_it" in out, out
        assert "leftovers after the run: 1 engine process (pid " in out
        assert "VLLM::EngineCore); `pdperf cleanup` removes them" in out
        assert outcome["clean"] is False and outcome["processes"][0]["command"] == "VLLM::EngineCore"
    finally:  # the engine stand-in, re-parented to init when that pytest ended
        pids = {p["pid"] for p in outcome["processes"]}
        leaks.remove_processes([p for p in leaks.list_processes() if p.pid in pids])


def test_a_clean_run_writes_a_clean_outcome(tmp_path):
    test_file = tmp_path / "test_clean.py"
    test_file.write_text("def test_nothing():\n    pass\n")
    run_dir = tmp_path / "run"
    proc = run_pytest(test_file, run_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outcome = json.loads((run_dir / "leftovers.json").read_text())
    assert outcome["clean"] is True
    assert outcome["processes"] == []


def test_cleanup_never_kills_a_process_that_reused_the_pid():
    """Listed, then gone, then its pid taken by another process: that one is left alone."""
    me = ProcessInfo(os.getpid(), 1.0, "engine", "VLLM::EngineCore", 1)  # this very process, another start time
    assert leaks.remove_processes([me]) == []
    assert psutil.pid_exists(os.getpid())
