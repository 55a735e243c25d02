"""A user's own topology and workload files, and bad options, as the user meets them: one line, exit 2.

A user on a cluster writes topology and workload YAML outside the repo and points the suite at
them (``--topologies-dir``, ``--workloads-dir``) or checks them first (``pdperf validate PATH``).
Every mistake must end in one line that names the file, the key and the fix, with pytest's usage
error (exit status 4) or ``pdperf``'s exit status 2, and no traceback. Each bad file below is tried
both ways: through pytest in a subprocess from the repo root, as a user runs it, and through
``pdperf validate``, which must print the same message on one line.

The pytest runs pass ``--collect-only``: the options and files are checked in ``pytest_configure``
either way, and should a case ever stop being refused, nothing is deployed. The helpers here
(``pytest_run``, ``error_block``, ``cli``, ``make_tokenizer``) are shared by the other
test_bad_input_* modules.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pdperf.cli import main as pdperf_main
from pdperf.specs import ROOT

pytestmark = pytest.mark.selftest

USAGE_ERROR = 4  # pytest.ExitCode.USAGE_ERROR


# -- helpers (shared by the other test_bad_input_* modules) --------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what the outer pytest sets for itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    return {**env, **extra}


def pytest_run(*args: str, timeout_s: float = 120.0, prefix: Sequence[str] = (),
               env: dict[str, str] | None = None) -> tuple[int, str]:
    """``python -m pytest ARGS`` from the repo root (``prefix``: a command to run it under)."""
    cmd = [*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(cmd)}` still running after {timeout_s:g} s; output so far:\n"
                    f"{(e.stdout or b'')[-2000:]!r}\n{(e.stderr or b'')[-2000:]!r}", pytrace=False)
    return proc.returncode, proc.stdout + proc.stderr


def error_block(output: str, prefix: str = "ERROR:") -> str:
    """The one error of ``output`` (its line starting with ``prefix``, and the indented lines under
    it that list a file's problems); fails if there is a traceback or more than one error line."""
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(starts) == 1, f"expected one line starting with {prefix!r}:\n{output}"
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return " ".join(block)


def cli(*argv: str) -> tuple[int, str, str]:
    """``pdperf ARGV`` in this process: (exit status, stdout, stderr). An exception escaping main
    is what the user would see as a traceback: it fails the test as it is."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pdperf_main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def make_tokenizer(folder: Path) -> Path:
    """A small BPE tokenizer (tokenizer.json) trained on a stdlib file: prompts for the stub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py")], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


# -- a user's spec files -------------------------------------------------------------------------

GOOD_TOPOLOGY = {"kind": "collocated", "device": "cpu", "model": "tiny-llama", "collocated": {"tp": 1}}
GOOD_WORKLOAD = {"device": "cpu", "isl": 64, "osl": 8,
                 "sweep": {"kind": "concurrency", "points": [1, 2], "requests_per_point": 4}}


@dataclass(frozen=True)
class BadSpec:
    """One bad file a user might write: its folder (topologies or workloads), name, text, and what
    the one line must say (each fragment)."""

    id: str
    folder: str  # "topologies" | "workloads"
    file: str
    text: str
    says: tuple[str, ...]


def _yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False)


BAD_SPECS = [
    BadSpec("broken-yaml", "topologies", "mine.yaml", "kind: collocated\ncollocated: {tp: 1\n",
            ("mine.yaml: not valid YAML",)),
    BadSpec("unknown-key", "topologies", "mine.yaml", _yaml({**GOOD_TOPOLOGY, "replica_count": 2}),
            ("mine.yaml: invalid", "replica_count: unknown key; check its spelling")),
    BadSpec("wrong-type", "topologies", "mine.yaml", _yaml({**GOOD_TOPOLOGY, "collocated": {"tp": "two"}}),
            ("mine.yaml: invalid", "collocated.tp: Input should be a valid integer")),
    BadSpec("name-differs-from-file", "topologies", "mine.yaml", _yaml({"name": "yours", **GOOD_TOPOLOGY}),
            ("mine.yaml: name 'yours' differs from the file name; rename one so they match",)),
    BadSpec("pd-prefill-tp-above-decode-tp", "topologies", "pd-mine.yaml",
            _yaml({"kind": "pd", "model": "llama-3.1-8b", "prefill": {"tp": 2}, "decode": {"tp": 1}}),
            ("topology pd-mine: prefill TP 2 > decode TP 1, which NixlConnector does not support; "
             "make decode TP >= prefill TP",)),
    BadSpec("collocated-without-its-block", "topologies", "mine.yaml",
            _yaml({"kind": "collocated", "model": "tiny-llama", "device": "cpu"}),
            ("kind 'collocated' needs a 'collocated: {replicas, tp}' block",)),
    BadSpec("slo-on-unknown-metric", "workloads", "wl-mine.yaml",
            _yaml({**GOOD_WORKLOAD, "slos": ["p99_latency_ms <= 500"]}),
            ("wl-mine.yaml: invalid", "metric 'latency_ms' is unknown; an SLO bounds one of ttft_ms, tpot_ms")),
    BadSpec("slo-not-a-bound", "workloads", "wl-mine.yaml", _yaml({**GOOD_WORKLOAD, "slos": ["ttft < 500"]}),
            ("SLO 'ttft < 500': expected the form 'p99_ttft_ms <= 500'",)),
    BadSpec("concurrency-zero", "workloads", "wl-mine.yaml",
            _yaml({**GOOD_WORKLOAD, "sweep": {**GOOD_WORKLOAD["sweep"], "points": [0, 4]}}),
            ("sweep: concurrency points must be whole numbers >= 1, got [0.0, 4.0]",)),
    BadSpec("workload-without-request-count", "workloads", "wl-mine.yaml",
            _yaml({**GOOD_WORKLOAD, "sweep": {"kind": "rate", "points": [2]}}),
            ("set 'requests_per_point' or 'requests_per_concurrency'",)),
    BadSpec("not-a-mapping", "workloads", "wl-mine.yaml", "- isl: 64\n- osl: 8\n",
            ("wl-mine.yaml: expected a mapping at the top level",)),
]


def spec_folders(base: Path, bad: BadSpec | None = None) -> tuple[Path, Path]:
    """A user's topologies/ and workloads/ outside the repo, each with a good file, plus ``bad``."""
    topos, wls = base / "my-topologies", base / "my-workloads"
    topos.mkdir(parents=True)
    wls.mkdir()
    (topos / "cpu-mine.yaml").write_text(_yaml(GOOD_TOPOLOGY))
    (wls / "wl-good.yaml").write_text(_yaml(GOOD_WORKLOAD))
    if bad is not None:
        (topos if bad.folder == "topologies" else wls).joinpath(bad.file).write_text(bad.text)
    return topos, wls


BAD_OPTIONS = {
    "requests-scale": (["--requests-scale=0"], "--requests-scale 0.0: must be > 0"),
    "max-alive": (["--max-alive=0"], "--max-alive 0: must be >= 1"),
    "engine-arg-without-equals": (["--engine-arg=enforce_eager"], "--engine-arg 'enforce_eager': expected KEY=VALUE"),
    "external-without-url": (["--backend=external"], "--backend external needs --external-url URL"),
    "deploy-timeout": (["--deploy-timeout=0"], "--deploy-timeout 0: must be > 0 seconds"),
}
FOLDER_STATES = [(option, state) for option in ("--topologies-dir", "--workloads-dir")
                 for state in ("missing", "empty", "a-file")]


@dataclass
class PytestRuns:
    """Every pytest run of this module, made at once (side by side: each is a fresh interpreter that
    spends its second or two importing), by case id: (exit status, output)."""

    base: Path
    outcomes: dict[str, tuple[int, str]]

    def folders(self, case: str) -> tuple[Path, Path]:
        return self.base / case / "my-topologies", self.base / case / "my-workloads"

    def __getitem__(self, case: str) -> tuple[int, str]:
        return self.outcomes[case]


def _pytest_cases(base: Path) -> dict[str, list[str]]:
    """Each case's pytest arguments, its files written under ``base / case``."""
    def with_folders(case: str, bad: BadSpec | None = None, *extra: str) -> list[str]:
        topos, wls = spec_folders(base / case, bad)
        return folder_args(base / case, topos, wls, *extra)

    def folder_args(where: Path, topos: Path, wls: Path, *extra: str) -> list[str]:
        return ["tests/smoke", "--collect-only", f"--run-dir={where / 'run'}", f"--topologies-dir={topos}",
                f"--workloads-dir={wls}", *extra]

    cases = {"good": with_folders("good"),
             "pattern-not-in-folder": with_folders("pattern-not-in-folder", None, "--topology=cpu-colloc-1xtp1")}
    cases.update({f"file-{bad.id}": with_folders(f"file-{bad.id}", bad) for bad in BAD_SPECS})
    for option, state in FOLDER_STATES:
        case = f"folder{option}-{state}"
        topos, wls = spec_folders(base / case)
        given = base / case / "given"
        if state == "empty":
            given.mkdir()
        elif state == "a-file":
            given.write_text("kind: collocated\n")
        folders = {"--topologies-dir": topos, "--workloads-dir": wls, option: given}
        cases[case] = folder_args(base / case, folders["--topologies-dir"], folders["--workloads-dir"])
    for case, (args, _) in BAD_OPTIONS.items():
        cases[f"option-{case}"] = ["tests/smoke", "--collect-only", f"--run-dir={base / case / 'run'}", *args]
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> PytestRuns:
    base = tmp_path_factory.mktemp("bad-input")
    cases = _pytest_cases(base)
    with ThreadPoolExecutor(max_workers=max(2, min(8, 2 * (os.cpu_count() or 1)))) as pool:
        futures = {case: pool.submit(pytest_run, *args) for case, args in cases.items()}
        return PytestRuns(base, {case: f.result() for case, f in futures.items()})


def test_good_user_folders_are_accepted(runs):
    """The reference for the cases below: the same folders without a bad file collect."""
    code, output = runs["good"]
    assert code == 0, output
    assert "cpu-mine" in output


@pytest.mark.parametrize("bad", BAD_SPECS, ids=[b.id for b in BAD_SPECS])
def test_bad_user_file_through_pytest(runs, bad):
    code, output = runs[f"file-{bad.id}"]
    assert code == USAGE_ERROR, output
    line = error_block(output)
    for fragment in bad.says:
        assert fragment in line, line
    topos, wls = runs.folders(f"file-{bad.id}")
    assert str((topos if bad.folder == "topologies" else wls) / bad.file) in line


@pytest.mark.parametrize("bad", BAD_SPECS, ids=[b.id for b in BAD_SPECS])
def test_bad_user_file_through_validate(tmp_path, bad):
    """``pdperf validate FOLDER``: a line per file, the bad one with the suite's message on one line."""
    topos, wls = spec_folders(tmp_path, bad)
    code, out, err = cli("validate", str(topos), str(wls))
    assert code == 2, out + err
    lines = out.splitlines()
    assert len(lines) == 3, out  # the two good files and the bad one, a line each
    bad_path = (topos if bad.folder == "topologies" else wls) / bad.file
    [line] = [ln for ln in lines if ln.startswith(f"{bad_path}:")]
    for fragment in bad.says:
        assert fragment in line, line
    assert f"{topos / 'cpu-mine.yaml'}: ok, topology 'cpu-mine'" in lines
    assert f"{wls / 'wl-good.yaml'}: ok, workload 'wl-good'" in lines
    assert err == "error: 1 of 3 checked are not valid (above)\n"
    assert "Traceback" not in out + err


@pytest.mark.parametrize("option,state", FOLDER_STATES, ids=[f"{o.lstrip('-')}-{s}" for o, s in FOLDER_STATES])
def test_spec_folder_missing_empty_or_a_file(runs, option, state):
    code, output = runs[f"folder{option}-{state}"]
    assert code == USAGE_ERROR, output
    line = error_block(output)
    what = "topology" if option == "--topologies-dir" else "workload"
    why = {"missing": "no such folder", "empty": f"no {what} files (*.yaml) in it", "a-file": "not a folder"}[state]
    given = runs.base / f"folder{option}-{state}" / "given"
    assert f"{option} {given}: {why}; pass a folder of {what} YAML files, or leave {option} out" in line


def test_topology_pattern_not_in_the_users_folder(runs):
    code, output = runs["pattern-not-in-folder"]
    assert code == USAGE_ERROR, output
    topos, _ = runs.folders("pattern-not-in-folder")
    assert f"--topology cpu-colloc-1xtp1: no such topology in {topos}; known: cpu-mine" in error_block(output)


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(runs, case):
    code, output = runs[f"option-{case}"]
    assert code == USAGE_ERROR, output
    assert BAD_OPTIONS[case][1] in error_block(output)


# -- pdperf validate on paths that are not spec files ---------------------------------------------

def test_validate_without_paths_checks_the_repos_files():
    code, out, err = cli("validate")
    assert code == 0 and err == "", err
    assert out.endswith("workloads are valid\n")


def test_validate_missing_path(tmp_path):
    code, out, err = cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert out == f"{tmp_path / 'nope.yaml'}: no such file or folder; pass topology or workload YAML files, " \
                  "or folders of them\n"


def test_validate_folder_without_yaml_files(tmp_path):
    (tmp_path / "mine.yml").write_text(_yaml(GOOD_TOPOLOGY))
    code, out, err = cli("validate", str(tmp_path))
    assert code == 2
    assert out == f"{tmp_path}: no *.yaml files in this folder (mine.yml: rename them to .yaml); the suite reads " \
                  "topology and workload files named *.yaml\n"


def test_validate_file_that_is_neither_topology_nor_workload(tmp_path):
    (tmp_path / "notes.yaml").write_text("owner: me\nreplicas: 4\n")
    code, out, err = cli("validate", str(tmp_path / "notes.yaml"))
    assert code == 2
    assert out.startswith(f"{tmp_path / 'notes.yaml'}: neither a topology (no 'kind' key) nor a workload "
                          "(none of isl, osl, sweep); a topology file has kind: collocated or pd")


def test_validate_workload_whose_sweep_kind_slipped_to_the_top(tmp_path):
    """A ``kind`` key makes a file a topology; a workload with its sweep kind at the top level is told so."""
    (tmp_path / "wl-mine.yaml").write_text(_yaml({**GOOD_WORKLOAD, "kind": "concurrency"}))
    code, out, err = cli("validate", str(tmp_path / "wl-mine.yaml"))
    assert code == 2
    assert out == (f"{tmp_path / 'wl-mine.yaml'}: has a 'kind' key ('concurrency'), so it is read as a topology, "
                   "but also a workload's isl, osl, sweep; if it is a workload, move 'kind' under 'sweep:'\n")
