"""SIGKILL of pytest itself, in the middle of a point, on the real stack.

A killed pytest runs no teardown: no Serve application deleted, no engine reaped, no run.json.
What must still hold: every point file it wrote is whole (atomic writes: a temporary file and a
rename, so at worst a hidden ``.<name>.tmp`` is left, which no reader takes for a point), and
``pdperf cleanup`` finds what it left running (the engine processes under its local Ray head's
replicas, re-parented to init once the head died with its driver) and removes it, after which
the leak listing is empty.

The killed run is a sweep of cpu-colloc-1xtp1 in a pytest of its own (its own local Ray head,
its own run folder in tmp); it is killed once its first point is saved and the next point's load
process is running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pdperf import leaks
from pdperf.report import load_run
from pdperf.results import load_point
from pdperf.specs import ROOT
from pdperf.waiting import poll_until
from tests.selftest.test_bad_input import clean_env

pytestmark = pytest.mark.faults

TOPOLOGY = "cpu-colloc-1xtp1"
WORKLOAD = "cpu-latency"  # two points of 60 requests: the second is in flight when the first is saved


def load_running(pid: int) -> bool:
    """Whether the run's measure fixture has a load process up (the runner's spawned worker)."""
    try:
        return any("spawn_main" in " ".join(c.cmdline()) for c in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def cleanup_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdperf.cli", "cleanup", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=clean_env())


def test_sigkill_of_pytest_mid_point(tmp_path: Path, pdperf_ctx, record_property):
    if pdperf_ctx.backend != "ray" or pdperf_ctx.options.ray_address:
        pytest.skip("kills a pytest that starts its own local Ray head: --backend ray without --ray-address")
    topo = pdperf_ctx.all_topologies.get(TOPOLOGY)
    reason = pdperf_ctx.skip_reason(topo) if topo is not None else f"no topology {TOPOLOGY}"
    if reason:
        pytest.skip(f"{TOPOLOGY} cannot run here: {reason}")
    if pdperf_ctx.pool is not None:
        # the run below starts engines of its own: this session's (an idle PD engine spins a core on 2
        # cores) would slow its start-up several-fold (seen in CI: 10 min instead of 1.5)
        pdperf_ctx.pool.release_all()
    run_dir = tmp_path / "run"
    log_path = tmp_path / "killed-pytest.log"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/sweeps", "-m", "sweep",
           "--topology", TOPOLOGY, "--workload", WORKLOAD, f"--run-dir={run_dir}"]
    with open(log_path, "wb") as log:
        # its own session: the SIGKILL is for that pytest alone, as a CI runner's or the OOM killer's would be
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    owned: list[psutil.Process] = []
    try:
        def mid_point() -> bool | None:
            if proc.poll() is not None:
                raise AssertionError(f"the sweep ended ({proc.returncode}) before it could be killed:\n"
                                     f"{log_path.read_text()[-3000:]}")
            saved = list((run_dir / "points").glob("*.json"))
            return True if saved and load_running(proc.pid) else None

        poll_until(mid_point, what="the first point saved and the next point's load running", timeout_s=900,
                   interval_s=0.2, max_interval_s=1.0)
        owned = descendants(proc.pid)
        engines_before = [p.pid for p in owned if leaks.classify(p.name(), p.cmdline()) == "engine"]
        assert engines_before, f"no engine process under the run: {[p.pid for p in owned]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

        # the points: whole JSON each; a temporary file of an interrupted write is no point
        points_dir = run_dir / "points"
        files = sorted(points_dir.glob("*.json"))
        assert files, "no point saved"
        for f in files:
            load_point(f)
        tmp_files = [f.name for f in points_dir.iterdir() if f.name.endswith(".tmp")]
        assert all(name.startswith(".") for name in tmp_files), tmp_files
        run = load_run(run_dir)
        assert len(run.points) == len(files), run.problems
        record_property("pdperf_killed_run", f"{len(files)} point(s) whole, temporary files {tmp_files}")

        # what it left: the engines, orphaned once the local head is gone (it dies with its driver)
        def orphaned_engines() -> list[leaks.ProcessInfo] | None:
            found = [p for p in leaks.orphans(leaks.list_processes()) if p.pid in engines_before]
            return found or None

        orphans = poll_until(orphaned_engines, what=f"the killed run's engines {engines_before} to be orphaned",
                             timeout_s=120)
        listing = cleanup_cli("--dry-run")
        assert listing.returncode == 0, listing.stderr
        for p in orphans:
            assert f"would remove engine process pid {p.pid} ({p.command}" in listing.stdout, listing.stdout
        print(f"left behind by the killed run (pdperf cleanup --dry-run):\n{listing.stdout}")
        record_property("pdperf_left_behind", listing.stdout.strip())
        removed = cleanup_cli()
        assert removed.returncode == 0, removed.stdout + removed.stderr
        for p in orphans:
            assert f"removed engine process pid {p.pid}" in removed.stdout, removed.stdout
        record_property("pdperf_cleanup", removed.stdout.strip())

        # nothing of the killed run is left: its Ray processes end as their head is gone, the rest was removed
        def all_gone() -> bool | None:
            alive = [p for p in owned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                     and leaks.classify(p.name(), p.cmdline()) is not None]
            return True if not alive else None

        poll_until(all_gone, what="every engine and Ray process of the killed run to exit", timeout_s=120,
                   describe=lambda: ", ".join(f"{p.pid} {p.name()}" for p in owned if p.is_running()))
        after = cleanup_cli("--dry-run")
        assert after.returncode == 0 and "nothing left behind" in after.stdout, after.stdout + after.stderr
    finally:
        # a failure above must not leave the killed run's engines and Ray processes to the leak check of this
        # session: take its tree before the kill (once killed, its children are orphans and not its own)
        if proc.poll() is None:
            owned = owned or descendants(proc.pid)
            proc.kill()
        leaks.remove_processes([info for info in map(as_info, owned) if info is not None])


def as_info(p: psutil.Process) -> leaks.ProcessInfo | None:
    """A process of the killed run as the cleanup takes it (None once it is gone)."""
    try:
        return leaks.ProcessInfo(p.pid, p.create_time(), "engine", p.name(), p.ppid())
    except psutil.Error:
        return None
