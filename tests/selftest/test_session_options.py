"""Session options: pytest's namespace (and the environment) into one checked, frozen SessionOptions.

The namespace is built from ``fixtures/options.py`` itself (its defaults), so a new option shows up
here without editing this file. Every mistake is a SpecError naming the option, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fixtures import options as options_plugin
from pdperf.backends.ray_serve import METRICS_REPORT_INTERVAL_MS
from pdperf.engine import engine_kwargs, with_engine_overrides
from pdperf.errors import SpecError
from pdperf.models import DEFAULT_CACHE
from pdperf.session.options import EnvSwitches, SessionOptions, load_specs
from pdperf.specs import ROOT, Topology

pytestmark = pytest.mark.selftest


class _OptionRecorder:
    """Stands in for pytest's parser: records each option's dest and default."""

    def __init__(self) -> None:
        self.defaults: dict[str, object] = {}

    def getgroup(self, *args, **kwargs) -> _OptionRecorder:
        return self

    def addoption(self, *names: str, **kw) -> None:
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        self.defaults[dest] = kw.get("default", False if kw.get("action") == "store_true" else None)


_recorder = _OptionRecorder()
options_plugin.pytest_addoption(_recorder)  # type: ignore[arg-type]


def namespace(**overrides) -> SimpleNamespace:
    unknown = set(overrides) - set(_recorder.defaults) - {"numprocesses"}
    assert not unknown, f"fixtures/options.py defines no option for {unknown}"
    return SimpleNamespace(**{**_recorder.defaults, **overrides})


def from_pytest(environ: dict[str, str] | None = None, **overrides) -> SessionOptions:
    return SessionOptions.from_namespace(namespace(**overrides), root=ROOT, environ=environ or {})


def error_of(**overrides) -> str:
    with pytest.raises(SpecError) as e:
        load_specs(from_pytest(**overrides))
    return str(e.value)


# -- from pytest's options -----------------------------------------------------------------------

def test_defaults_are_the_repos_folders_and_no_overrides():
    o = from_pytest()
    assert (o.backend, o.device, o.topology_patterns, o.workload_patterns) == ("ray", "auto", (), ())
    assert o.topologies_dir == ROOT / "topologies" and o.workloads_dir == ROOT / "workloads"
    assert (o.max_alive, o.deploy_timeout_s, o.requests_scale, o.prestart) == (2, 900.0, 1.0, True)
    assert o.engine_overrides == {} and o.env == EnvSwitches()


def test_options_are_frozen_and_take_no_unknown_field():
    o = SessionOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.backend = "vllm"  # type: ignore[misc]
    with pytest.raises(TypeError):
        SessionOptions(replicas=2)  # type: ignore[call-arg]


def test_patterns_and_folders_come_through(tmp_path):
    o = from_pytest(topology=["cpu-*"], workload=["cpu-rate"], topologies_dir=str(tmp_path), no_prestart=True)
    assert o.topology_patterns == ("cpu-*",) and o.workload_patterns == ("cpu-rate",)
    assert o.topologies_dir == tmp_path and o.prestart is False


# -- mistakes: one message naming the option, the value and the fix -------------------------------

def test_unknown_topology_lists_the_known_ones():
    msg = error_of(topology=["cpu-*", "no-such-topology"])
    assert msg.startswith("--topology no-such-topology: no such topology in topologies/")
    assert "cpu-*" not in msg.split(":")[0]  # only the pattern that matched nothing is named
    assert "cpu-pd-1p1-1d1" in msg and "colloc-1xtp1" in msg


def test_unknown_workload_lists_the_known_ones():
    msg = error_of(workload=["no-such-workload"])
    assert "--workload no-such-workload" in msg and "smoke-cpu" in msg


@pytest.mark.parametrize("overrides,needle", [
    ({"requests_scale": 0.0}, "--requests-scale 0.0: must be > 0"),
    ({"max_alive": 0}, "--max-alive 0: must be >= 1"),
    ({"deploy_timeout": -1.0}, "--deploy-timeout -1: must be > 0 seconds"),
    ({"stream_batching_ms": -5}, "--stream-batching-ms -5: must be >= 0"),
    ({"backend": "external"}, "--backend external needs --external-url URL"),
    ({"keep_deployments": True}, "--keep-deployments needs --ray-address"),
    ({"numprocesses": 2}, "-n 2: pytest-xdist workers would each start their own local Ray head"),
    ({"backend": "kubernetes"}, "--backend kubernetes: expected one of ray, vllm, external"),
])
def test_bad_values_name_the_option_and_the_fix(overrides, needle):
    with pytest.raises(SpecError, match=re.escape(needle)):
        from_pytest(**overrides)


def test_xdist_is_fine_with_a_ray_address_or_another_backend():
    assert from_pytest(numprocesses=2, ray_address="auto").xdist_workers == 2
    assert from_pytest(numprocesses=2, backend="vllm").backend == "vllm"


@pytest.mark.parametrize("bad,needle", [("enforce_eager", "expected KEY=VALUE"), ("=1", "expected KEY=VALUE"),
                                        ("x={a: [", "not valid YAML")])
def test_bad_engine_arg_names_the_fix(bad, needle):
    with pytest.raises(SpecError, match=re.escape(needle)) as e:
        from_pytest(engine_arg=[bad])
    assert "--engine-arg" in str(e.value)


# -- --engine-arg over every topology --------------------------------------------------------------

def test_engine_args_lay_over_every_topology():
    o = from_pytest(engine_arg=["enforce_eager=true", "max_num_seqs=128", "compilation_config={level: 0}"])
    assert o.engine_overrides == {"enforce_eager": True, "max_num_seqs": 128, "compilation_config": {"level": 0}}
    t = load_specs(o).topologies["colloc-2xtp1"]
    assert t.engine_kwargs["enforce_eager"] is True and t.engine_kwargs["compilation_config"] == {"level": 0}
    kw = engine_kwargs(t, "collocated", ROOT / "nowhere")
    assert kw["max_num_seqs"] == 128 and kw["tensor_parallel_size"] == 1
    assert load_specs(from_pytest()).topologies["colloc-2xtp1"].engine_kwargs == {}


def test_engine_args_merge_nested_dicts():
    # gpu-testmachine.sh switches FlashInfer's all-reduce fusion off (NVLink multicast); a user's
    # own compilation_config must not drop that.
    o = from_pytest(engine_arg=["compilation_config={pass_config: {fuse_allreduce_rms: false}}",
                                "compilation_config={level: 0}"])
    assert o.engine_overrides == {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}, "level": 0}}
    t = Topology(name="x", kind="collocated", model="m", collocated={"tp": 2},
                 engine_kwargs={"compilation_config": {"cudagraph_capture_sizes": [1, 2]}, "max_num_seqs": 64})
    assert with_engine_overrides(t, o.engine_overrides).engine_kwargs == {"max_num_seqs": 64, "compilation_config": {
        "cudagraph_capture_sizes": [1, 2], "pass_config": {"fuse_allreduce_rms": False}, "level": 0}}


# -- --topologies-dir / --workloads-dir -------------------------------------------------------------

CPU_COLLOC = {"kind": "collocated", "device": "cpu", "model": "tiny-llama", "collocated": {"tp": 1}}


def write_specs(folder: Path, specs: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in specs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_own_topologies_folder_is_used(tmp_path):
    mine = write_specs(tmp_path / "mine", {"my-colloc": CPU_COLLOC})
    specs = load_specs(from_pytest(topologies_dir=str(mine)))
    assert list(specs.topologies) == ["my-colloc"]
    assert "smoke-cpu" in specs.workloads  # the repo's workloads still


def test_unknown_topology_names_the_own_folder(tmp_path):
    mine = write_specs(tmp_path / "mine", {"my-colloc": CPU_COLLOC})
    msg = error_of(topologies_dir=str(mine), topology=["colloc-1xtp1"])
    assert msg == f"--topology colloc-1xtp1: no such topology in {mine}; known: my-colloc"


@pytest.mark.parametrize("option,what", [("topologies_dir", "topology"), ("workloads_dir", "workload")])
def test_missing_folder_names_the_option_the_value_and_the_fix(tmp_path, option, what):
    flag = "--" + option.replace("_", "-")
    msg = error_of(**{option: str(tmp_path / "nowhere")})
    assert msg.startswith(f"{flag} {tmp_path / 'nowhere'}: no such folder; pass a folder of {what} YAML files")
    (tmp_path / "a-file").write_text("")
    assert "not a folder" in error_of(**{option: str(tmp_path / "a-file")})
    (tmp_path / "empty").mkdir()
    assert f"no {what} files (*.yaml) in it" in error_of(**{option: str(tmp_path / "empty")})


def test_a_bad_file_in_an_own_folder_is_named_with_its_key(tmp_path):
    mine = write_specs(tmp_path / "mine", {"a-good": CPU_COLLOC, "b-bad": {**CPU_COLLOC, "replica_count": 2}})
    msg = error_of(topologies_dir=str(mine))
    assert str(mine / "b-bad.yaml") in msg and "replica_count: unknown key" in msg
    wl = tmp_path / "wl"
    wl.mkdir()
    (wl / "broken.yaml").write_text("isl: 10\nsweep: {kind: concurrency, points: [1\n")
    msg = error_of(workloads_dir=str(wl))
    assert str(wl / "broken.yaml") in msg and "not valid YAML" in msg


# -- the environment's switches, read once --------------------------------------------------------

def test_env_switches_defaults_without_any_variable():
    env = EnvSwitches.from_environ({})
    assert env == EnvSwitches() and env.wrap_ray_servers and env.git_sha is None
    assert env.model_cache == DEFAULT_CACHE and env.metrics_report_interval_ms == METRICS_REPORT_INTERVAL_MS
    assert env.cuda_visible_devices is None


def test_env_switches_from_the_environment(tmp_path):
    env = EnvSwitches.from_environ({"PDPERF_WRAP_RAY_SERVERS": "0", "PDPERF_GIT_SHA": "355fef3abcde\n",
                                    "PDPERF_MODEL_CACHE": str(tmp_path), "RAY_metrics_report_interval_ms": "250",
                                    "CUDA_VISIBLE_DEVICES": "2,3"})
    assert env == EnvSwitches(wrap_ray_servers=False, git_sha="355fef3abcde", model_cache=tmp_path,
                              metrics_report_interval_ms=250, cuda_visible_devices="2,3")
    assert EnvSwitches.from_environ({"PDPERF_WRAP_RAY_SERVERS": "1"}).wrap_ray_servers
    assert from_pytest(environ={"PDPERF_GIT_SHA": "abc"}).env.git_sha == "abc"


def test_a_bad_metrics_interval_names_the_variable():
    with pytest.raises(SpecError, match=r"RAY_metrics_report_interval_ms='1s': expected whole milliseconds"):
        EnvSwitches.from_environ({"RAY_metrics_report_interval_ms": "1s"})


def test_backend_options_carry_what_deployments_need(tmp_path):
    o = from_pytest(environ={"PDPERF_WRAP_RAY_SERVERS": "0", "PDPERF_MODEL_CACHE": str(tmp_path)},
                    backend="vllm", model="llama-3.1-8b", stream_batching_ms=50)
    b = o.backend_options()
    assert (b.name, b.model_override, b.stream_batching_ms, b.wrap_ray_servers, b.model_cache) == (
        "vllm", "llama-3.1-8b", 50, False, tmp_path)
