"""A reports folder that cannot be written, and a disk that fills up mid-run: one line, nothing lost.

Read-only: ``--run-dir`` pointing into a folder made read-only (chmod 0555), and at a run folder
of an earlier run made read-only. pytest must stop at configure time with one usage error,
before anything is measured, and leave what is in the folder as it was. Root ignores folder
permissions (CAP_DAC_OVERRIDE), so as root the pytest and pdperf runs go through
``setpriv`` with that capability dropped: the same refusal an ordinary user gets.

Full disk: the run folder sits on a real 256 KiB tmpfs (``mount -t tmpfs -o size=256k``; as
root, else these tests skip). A test file written here drives the suite's own ``measure`` fixture
against the loopback stub (in its own process, not the serving stack): two points are saved, then
the disk is filled to the last block by a file written until the kernel answers ENOSPC, and the
third point's save must fail with one line, "no space left on <mount> (tmpfs) writing <file>",
while the two saved points stay whole. Once with the filler removed at the test's end (the
measure fixture alone), once with the disk still full when the session writes its summary.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdperf.loadgen.stub_server import StubBehavior, StubServerProcess
from pdperf.report.synthetic import synthetic_point
from pdperf.results import WriteError, atomic_write_text, load_point, save_point
from pdperf.specs import ROOT
from tests.selftest.test_bad_input import USAGE_ERROR, clean_env, error_block, make_tokenizer, pytest_run

pytestmark = pytest.mark.selftest


def unprivileged() -> list[str]:
    """A command prefix under which folder permissions apply (as root: setpriv dropping the override)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, folder permissions are ignored and setpriv (util-linux) is not there to drop "
                    "CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def reports(tmp_path) -> Iterator[Path]:
    """A reports/ folder holding an earlier run's point; made writable again for clean-up."""
    folder = tmp_path / "reports"
    save_point(folder / "20260101-000000" / "points" / "colloc__wl__c4.json", synthetic_point("colloc", n=20))
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)


# -- read-only ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["new-run-in-read-only-reports", "read-only-earlier-run"])
def test_run_dir_that_cannot_be_written(reports, target):
    earlier = reports / "20260101-000000"
    if target == "new-run-in-read-only-reports":
        run_dir = reports / "20260102-000000"
        reports.chmod(0o555)
    else:
        run_dir = earlier
        earlier.chmod(0o555)
    before = snapshot(reports)
    # a selftest module as the tests to run: should the refusal ever go, nothing heavy starts
    code, output = pytest_run("tests/selftest/test_waiting.py", f"--run-dir={run_dir}", prefix=unprivileged())
    assert code == USAGE_ERROR, output
    assert error_block(output) == (f"ERROR: --run-dir {run_dir}: cannot write there (Permission denied); pass a "
                                   "folder you can write to; nothing was run and nothing in it was changed")
    assert snapshot(reports) == before and sorted(p.name for p in reports.iterdir()) == ["20260101-000000"]


def test_report_into_a_read_only_run_folder(reports):
    run = reports / "20260101-000000"
    run.chmod(0o555)
    before = snapshot(reports)
    proc = subprocess.run([*unprivileged(), sys.executable, "-m", "pdperf.cli", "report", str(run)], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (f"error: permission denied writing {run / 'results.csv'}: {run} is not writable by this "
                           "user; make it writable or write somewhere else\n")
    assert snapshot(reports) == before


# -- a full disk -------------------------------------------------------------------------------------

def mount_tmpfs(folder: Path, size: str = "256k") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full disk is made as a small tmpfs, which takes root to mount")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): no real full disk to test against")


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)  # busy: detach it


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    folder = tmp_path / "disk"
    mount_tmpfs(folder)
    try:
        yield folder
    finally:
        unmount(folder)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no block left (the kernel answers ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk):
    target = small_disk / "points" / "c4.json"
    atomic_write_text(target, "old\n")
    fill(small_disk / "filler")
    with pytest.raises(WriteError) as e:
        atomic_write_text(target, "new " * 10_000)
    assert str(e.value) == f"no space left on {small_disk} (tmpfs) writing {target}; free space there or write " \
                           "somewhere else"
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, not the flush-then-close chain
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["c4.json"]


MEASURING_TEST = '''
"""Written by tests/selftest/test_bad_input_disk.py: three points through the suite's measure
fixture against the stub; the disk is filled before the third."""
import os
from pathlib import Path

import pytest

from pdperf.backends.base import Endpoint
from pdperf.specs import Sweep, Topology, Workload


@pytest.fixture
def filler(run_dir):
    path = run_dir / "filler"
    yield path
    if os.environ["FREE_AT_END"] == "1":
        path.unlink(missing_ok=True)


def test_three_points(measure, filler):
    topology = Topology(name="stub", kind="collocated", device="cpu", model="tiny-llama", collocated={"tp": 1})
    endpoint = Endpoint(topology=topology, backend="external", base_url=os.environ["STUB_URL"], model_id="stub-model",
                        tokenizer_path=Path(os.environ["TOK_DIR"]))
    for c in (1, 2, 3):
        if c == 3:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, bytes(4096))
            except OSError:
                pass  # ENOSPC: full
            finally:
                os.close(fd)
        workload = Workload(name="stub-wl", isl=32, osl=8, request_timeout_s=30,
                            sweep=Sweep(kind="concurrency", points=[c], requests_per_point=20))
        measure(endpoint, workload, c, processes=0)
'''


@dataclass
class DiskRun:
    code: int
    output: str
    run_dir: Path
    disk: Path

    @property
    def message(self) -> str:
        return (f"no space left on {self.disk} (tmpfs) writing {self.run_dir / 'points' / 'stub__stub-wl__c3.json'}; "
                "free space there or write somewhere else")


@pytest.fixture(scope="module")
def stub_and_tokenizer(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    with StubServerProcess(StubBehavior(ttft_s=0.002, prompt_tokens=32)) as url:
        yield url, tok


def run_filling_the_disk(tmp_path: Path, disk: Path, stub_and_tokenizer: tuple[str, Path], *,
                         free_at_end: bool) -> DiskRun:
    url, tok = stub_and_tokenizer
    test_file = tmp_path / "tests" / "test_measuring.py"
    test_file.parent.mkdir()
    test_file.write_text(MEASURING_TEST)
    run_dir = disk / "run"
    # the repo's plugins by name: a test file outside the repo does not load its conftest.py
    code, output = pytest_run(str(test_file), "-c", str(ROOT / "pytest.ini"), f"--rootdir={ROOT}",
                              "-p", "fixtures.options", "-p", "fixtures.session", "-p", "fixtures.reporting",
                              f"--run-dir={run_dir}",
                              env=clean_env(STUB_URL=url, TOK_DIR=str(tok), FREE_AT_END="1" if free_at_end else "0"))
    return DiskRun(code, output, run_dir, disk)


def assert_saved_points_kept(run: DiskRun) -> None:
    points = run.run_dir / "points"
    assert sorted(p.name for p in points.iterdir()) == ["stub__stub-wl__c1.json", "stub__stub-wl__c2.json"], \
        run.output  # no third point, no temp file left behind
    for name, c in (("stub__stub-wl__c1.json", 1), ("stub__stub-wl__c2.json", 2)):
        p = load_point(points / name)
        assert p.point_id == f"c{c}" and p.summary.requests_ok == 20
        json.loads((points / name).read_text())


def lines_outside_the_summary(output: str) -> list[str]:
    """The output without pytest's short summary, which repeats each failure's first line."""
    head, _, _ = output.partition("short test summary info")
    return head.splitlines()


def test_full_disk_mid_run_says_so_once_and_keeps_the_saved_points(tmp_path, small_disk, stub_and_tokenizer):
    run = run_filling_the_disk(tmp_path, small_disk, stub_and_tokenizer, free_at_end=True)
    assert run.code == 1, run.output  # the test that lost its point failed; the session ended normally
    assert "Traceback" not in run.output and "INTERNALERROR" not in run.output, run.output
    said = [line for line in lines_outside_the_summary(run.output) if "no space left" in line]
    assert said == [f"point stub/stub-wl/c3 measured but not saved: {run.message}; the 2 point(s) saved before are "
                    f"in {run.run_dir}"], run.output
    assert_saved_points_kept(run)
    assert f"pdperf: 2 point result(s) in {run.run_dir}" in run.output


@pytest.fixture(scope="module")
def disk_full_to_the_end(tmp_path_factory, stub_and_tokenizer) -> Iterator[DiskRun]:
    """One run for the two tests below (it takes seconds); its tmpfs stays full until both are done."""
    base = tmp_path_factory.mktemp("full-to-the-end")
    mount_tmpfs(base / "disk")
    try:
        yield run_filling_the_disk(base, base / "disk", stub_and_tokenizer, free_at_end=False)
    finally:
        unmount(base / "disk")


def test_disk_full_to_the_end_keeps_the_saved_points(disk_full_to_the_end):
    assert disk_full_to_the_end.code != 0
    assert_saved_points_kept(disk_full_to_the_end)
    assert stat.S_ISREG((disk_full_to_the_end.run_dir / "filler").stat().st_mode)  # still full at the end


def test_disk_full_to_the_end_says_so_once(disk_full_to_the_end):
    run = disk_full_to_the_end
    assert "Traceback" not in run.output and "INTERNALERROR" not in run.output, run.output
    said = [line for line in lines_outside_the_summary(run.output) if "no space left" in line]
    assert len(said) == 1 and run.message in said[0], run.output
