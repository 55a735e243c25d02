"""Specs: every YAML in the repo validates, and a wrong file fails with a message that names the fix.

A typo in a topology must not become a silently different benchmark, so each error case here
checks three things: it is a ``SpecError``, it names the file, and it says what to change.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

from pdperf.errors import SpecError
from pdperf.specs import SLO, TOPOLOGY_DIR, WORKLOAD_DIR, all_topologies, all_workloads, load_topology, load_workload

pytestmark = pytest.mark.selftest

TOPOLOGY_FILES = sorted(TOPOLOGY_DIR.glob("*.yaml"))
WORKLOAD_FILES = sorted(WORKLOAD_DIR.glob("*.yaml"))

PD = {"kind": "pd", "model": "tiny-llama", "prefill": {"replicas": 1, "tp": 1}, "decode": {"replicas": 1, "tp": 1}}
COLLOC = {"kind": "collocated", "model": "tiny-llama", "collocated": {"replicas": 1, "tp": 1}}
WORKLOAD = {"isl": 128, "osl": 16, "sweep": {"kind": "concurrency", "points": [1, 2], "requests_per_point": 4}}


def write(directory: Path, name: str, data: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def spec_error(loader, path: Path) -> str:
    with pytest.raises(SpecError) as e:
        loader(path)
    msg = str(e.value)
    assert str(path) in msg, f"the error does not name the file: {msg}"
    return msg


# -- the repo's own files ----------------------------------------------------------------------

def test_repo_has_topologies_and_workloads():
    assert TOPOLOGY_FILES, f"no topology files in {TOPOLOGY_DIR}"
    assert WORKLOAD_FILES, f"no workload files in {WORKLOAD_DIR}"


@pytest.mark.parametrize("path", TOPOLOGY_FILES, ids=[p.name for p in TOPOLOGY_FILES])
def test_topology_file_validates(path):
    topology = load_topology(path)
    assert topology.name == path.stem
    assert topology.engines >= 1


@pytest.mark.parametrize("path", WORKLOAD_FILES, ids=[p.name for p in WORKLOAD_FILES])
def test_workload_file_validates(path):
    workload = load_workload(path)
    assert workload.name == path.stem
    topologies = all_topologies()
    for pattern in workload.topologies:
        assert any(fnmatchcase(name, pattern) for name in topologies), (
            f"{path.name}: topologies pattern {pattern!r} matches no file in topologies/")


def test_names_are_unique():
    topologies, workloads = all_topologies(), all_workloads()
    assert len(topologies) == len(TOPOLOGY_FILES)
    assert len(workloads) == len(WORKLOAD_FILES)
    assert not set(topologies) & set(workloads), "a topology and a workload share a name: ids become ambiguous"


# -- topology errors ---------------------------------------------------------------------------

def test_prefill_tp_above_decode_tp_names_nixl(tmp_path):
    path = write(tmp_path, "pd-bad-tp", {**PD, "prefill": {"tp": 4}, "decode": {"tp": 2}})
    msg = spec_error(load_topology, path)
    assert "prefill TP 4 > decode TP 2" in msg
    assert "NixlConnector" in msg
    assert "decode TP >= prefill TP" in msg


def test_kv_connector_reaches_the_engines_and_unknown_ones_are_named(tmp_path):
    from pdperf.engine import engine_kwargs

    push = load_topology(write(tmp_path, "pd-push", {**PD, "kv_connector": "NixlPushConnector"}))
    for role in ("prefill", "decode"):
        assert engine_kwargs(push, role, tmp_path)["kv_transfer_config"]["kv_connector"] == "NixlPushConnector"
    default = load_topology(write(tmp_path, "pd-default", PD))
    assert engine_kwargs(default, "decode", tmp_path)["kv_transfer_config"]["kv_connector"] == "NixlConnector"
    msg = spec_error(load_topology, write(tmp_path, "pd-bad-connector", {**PD, "kv_connector": "Nixl"}))
    assert "kv_connector" in msg and "NixlPushConnector" in msg


def test_spread_on_collocated_is_refused(tmp_path):
    path = write(tmp_path, "colloc-spread", {**COLLOC, "device": "gpu", "placement": "spread"})
    msg = spec_error(load_topology, path)
    assert "spread" in msg and "kind 'pd'" in msg


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "pd-typo", {**PD, "placment": "pack"})
    msg = spec_error(load_topology, path)
    assert "placment" in msg
    assert "unknown key" in msg


def test_unknown_key_in_a_nested_block_is_named(tmp_path):
    path = write(tmp_path, "pd-typo2", {**PD, "decode": {"replicas": 1, "tpp": 2}})
    msg = spec_error(load_topology, path)
    assert "decode.tpp" in msg and "unknown key" in msg


def test_cpu_device_with_tp2_is_refused(tmp_path):
    path = write(tmp_path, "cpu-tp2", {**COLLOC, "device": "cpu", "collocated": {"replicas": 1, "tp": 2}})
    msg = spec_error(load_topology, path)
    assert "device 'cpu' serves with TP 1 only (got TP 2)" in msg


def test_cpu_device_with_needs_efa_is_refused(tmp_path):
    path = write(tmp_path, "cpu-efa", {**PD, "device": "cpu", "needs_efa": True})
    assert "drop 'spread'/'needs_efa'" in spec_error(load_topology, path)


def test_pd_without_decode_block(tmp_path):
    path = write(tmp_path, "pd-half", {k: v for k, v in PD.items() if k != "decode"})
    assert "needs both 'prefill' and 'decode'" in spec_error(load_topology, path)


def test_name_must_match_file_name(tmp_path):
    path = write(tmp_path, "pd-one", {**PD, "name": "pd-two"})
    msg = spec_error(load_topology, path)
    assert "pd-two" in msg and "file name" in msg


def test_name_defaults_to_file_name(tmp_path):
    assert load_topology(write(tmp_path, "pd-implicit", PD)).name == "pd-implicit"


def test_not_yaml_and_not_a_mapping(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: pd\nprefill: [unclosed\n")
    assert "not valid YAML" in spec_error(load_topology, broken)
    listing = tmp_path / "listing.yaml"
    listing.write_text("- a\n- b\n")
    assert "expected a mapping" in spec_error(load_topology, listing)
    assert "no such file" in spec_error(load_topology, tmp_path / "absent.yaml")


# -- workload errors ---------------------------------------------------------------------------

def test_prefix_repetition_without_prefix_len(tmp_path):
    path = write(tmp_path, "prefix", {**WORKLOAD, "dataset": "prefix_repetition"})
    msg = spec_error(load_workload, path)
    assert "prefix_repetition needs 0 < prefix_len < isl" in msg
    assert "prefix_len 0" in msg


def test_sweep_without_request_count(tmp_path):
    path = write(tmp_path, "no-count", {**WORKLOAD, "sweep": {"kind": "concurrency", "points": [1]}})
    assert "requests_per_point" in spec_error(load_workload, path)


def test_fractional_concurrency_is_refused(tmp_path):
    path = write(tmp_path, "frac", {**WORKLOAD, "sweep": {**WORKLOAD["sweep"], "points": [1.5]}})
    assert "whole numbers" in spec_error(load_workload, path)


def test_bad_slo_in_a_workload_names_the_file(tmp_path):
    path = write(tmp_path, "bad-slo", {**WORKLOAD, "slos": ["p99_ttft_ms < 500"]})
    msg = spec_error(load_workload, path)
    assert "slos" in msg and "p99_ttft_ms <= 500" in msg


def test_slos_parse_in_a_workload(tmp_path):
    workload = load_workload(write(tmp_path, "good-slo", {**WORKLOAD, "slos": ["p99_ttft_ms <= 500", "p90_tpot_ms <= 50"]}))
    assert [str(s) for s in workload.slos] == ["p99_ttft_ms <= 500", "p90_tpot_ms <= 50"]


# -- SLO ---------------------------------------------------------------------------------------

def test_slo_parse():
    slo = SLO.parse("p99_ttft_ms <= 500")
    assert (slo.metric, slo.percentile, slo.bound) == ("ttft_ms", 99.0, 500.0)
    assert slo.key == "p99_ttft_ms"
    assert str(slo) == "p99_ttft_ms <= 500"
    assert SLO.parse(str(slo)) == slo


def test_slo_parse_fractional_percentile_and_spacing():
    slo = SLO.parse("  p99.9_itl_ms<=12.5 ")
    assert (slo.metric, slo.percentile, slo.bound) == ("itl_ms", 99.9, 12.5)
    assert slo.key == "p999_itl_ms"


@pytest.mark.parametrize("text,names", [
    ("garbage", "expected the form 'p99_ttft_ms <= 500'"),
    ("p99_ttft_ms >= 500", "expected the form"),
    ("p99_ttft_ms <= 1.2.3", "expected the form"),
    ("p99_foo_ms <= 500", "ttft_ms"),  # an unknown metric lists the known ones
    ("p0_ttft_ms <= 500", "percentile"),
    ("p99_ttft_ms <= 0", "bound"),
])
def test_slo_parse_refuses(text, names):
    with pytest.raises(SpecError) as e:
        SLO.parse(text)
    assert text in str(e.value) and names in str(e.value)
