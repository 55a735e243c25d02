"""The backend factory, the engine configuration both backends share, and ``pdperf serve`` on them.

Deployments are made, never launched: nothing here starts Ray, vLLM or a process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdperf import cli
from pdperf.backends import factory
from pdperf.backends.factory import BackendOptions, make_deployment
from pdperf.backends.ray_serve import RayServeDeployment
from pdperf.backends.vllm_proc import ExternalDeployment, GpuLedger, VllmProcessDeployment, visible_gpus
from pdperf.engine import engine_env, vllm_serve_args, vllm_serve_env, vllm_serve_flags
from pdperf.errors import ClusterError, PdperfError, SpecError
from pdperf.specs import Topology, all_topologies

pytestmark = pytest.mark.selftest

TOPOS = all_topologies()
CPU, GPU, PD = TOPOS["cpu-colloc-1xtp1"], TOPOS["colloc-1xtp2"], TOPOS["cpu-pd-1p1-1d1"]


class FakeCluster:
    local = True
    stopped = False

    def stop(self) -> None:
        self.stopped = True


# -- make_deployment -------------------------------------------------------------------------------

def test_ray_deployment_takes_every_setting(tmp_path):
    backend = BackendOptions(name="ray", model_override="llama-3.1-8b", stream_batching_ms=50, keep_deployments=True,
                             wrap_ray_servers=False, model_cache=tmp_path)
    cluster = FakeCluster()
    gpu = make_deployment(backend, GPU, log_dir=tmp_path, cluster=cluster)  # type: ignore[arg-type]
    assert isinstance(gpu, RayServeDeployment) and gpu.cluster is cluster
    assert (gpu.model, gpu.stream_batching_interval_ms, gpu.keep, gpu.wrap_servers, gpu.model_cache) == (
        "llama-3.1-8b", 50, True, False, tmp_path)
    cpu = make_deployment(backend, CPU, log_dir=tmp_path, cluster=cluster)  # type: ignore[arg-type]
    assert cpu.model == "tiny-llama"  # --model swaps GPU topologies' model only


def test_ray_deployment_needs_the_connected_cluster(tmp_path):
    with pytest.raises(ClusterError, match="cpu-colloc-1xtp1: internal: the Ray cluster is not connected"):
        make_deployment(BackendOptions(name="ray"), CPU, log_dir=tmp_path)


def test_vllm_deployments_share_the_ledger_they_are_given(tmp_path):
    ledger = GpuLedger(["0", "1"])
    backend = BackendOptions(name="vllm", model_cache=tmp_path)
    a = make_deployment(backend, GPU, log_dir=tmp_path / "logs", ledger=ledger)
    b = make_deployment(backend, CPU, log_dir=tmp_path / "logs", ledger=ledger)
    assert isinstance(a, VllmProcessDeployment) and a.ledger is ledger and b.ledger is ledger
    assert a.log_dir == tmp_path / "logs" and a.model_cache == tmp_path
    with pytest.raises(ClusterError, match="needs the session's GPU ledger"):
        make_deployment(backend, CPU, log_dir=tmp_path)


def test_external_deployment(tmp_path):
    backend = BackendOptions(name="external", external_url="http://10.0.0.1:8000/", external_model="m",
                             tokenizer="tiny-llama")
    d = make_deployment(backend, CPU, log_dir=tmp_path)
    assert isinstance(d, ExternalDeployment)
    assert (d.url, d.model_id, d.tokenizer) == ("http://10.0.0.1:8000", "m", "tiny-llama")
    with pytest.raises(SpecError, match="--backend external needs --external-url"):
        make_deployment(BackendOptions(name="external"), CPU, log_dir=tmp_path)


# -- pdperf serve goes through the factory ----------------------------------------------------------

class FakeDeployment:
    def __init__(self) -> None:
        self.stopped = False

    def start(self, timeout_s: float):
        raise PdperfError("topology cpu-colloc-1xtp1: did not start (a test stand-in)")

    def stop(self, **kw) -> None:
        self.stopped = True


@pytest.mark.parametrize("backend", ["ray", "vllm"])
def test_serve_makes_its_deployment_through_the_factory(monkeypatch, tmp_path, capsys, backend):
    made, clusters = [], []

    def fake_make(b, t, *, log_dir, cluster=None, ledger=None):
        made.append((b, t.name, log_dir, cluster, ledger))
        return made_deployment

    def fake_start_cluster(address, *, metrics_report_interval_ms):
        clusters.append((address, metrics_report_interval_ms, FakeCluster()))
        return clusters[-1][2]

    made_deployment = FakeDeployment()
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # serve's SIGTERM handler: not in pytest's process
    monkeypatch.setattr(factory, "make_deployment", fake_make)
    monkeypatch.setattr(factory, "start_cluster", fake_start_cluster)
    monkeypatch.setenv("PDPERF_WRAP_RAY_SERVERS", "0")
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")
    code = cli.main(["serve", "cpu-colloc-1xtp1", "--backend", backend, "--model", "llama-3.1-8b",
                     "--log-dir", str(tmp_path)])
    assert code == 2 and "did not start" in capsys.readouterr().err
    [(b, name, log_dir, cluster, ledger)] = made
    assert (b.name, b.model_override, b.wrap_ray_servers, name, log_dir) == (
        backend, "llama-3.1-8b", False, "cpu-colloc-1xtp1", Path(tmp_path))
    assert isinstance(ledger, GpuLedger) and made_deployment.stopped
    if backend == "ray":
        assert clusters and clusters[0][:2] == (None, 500) and cluster is clusters[0][2] and cluster.stopped
    else:
        assert not clusters and cluster is None


def test_serve_and_plan_read_topologies_from_an_own_folder(tmp_path, capsys):
    assert cli.main(["plan", "no-such", "--topologies-dir", str(tmp_path / "nowhere")]) == 2
    assert "--topologies-dir" in capsys.readouterr().err
    assert cli.main(["serve", "no-such", "--topologies-dir", str(tmp_path)]) == 2
    assert f"topology 'no-such': not in {tmp_path}" in capsys.readouterr().err


# -- engine configuration, one module for both backends --------------------------------------------

def test_vllm_cli_flags_keep_false_and_nested_dicts():
    assert vllm_serve_flags({"enforce_eager": True, "enable_prefix_caching": False, "seed": None, "max_num_seqs": 8,
                             "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}) == [
        "--enforce-eager", "--no-enable-prefix-caching", "--max-num-seqs", "8",
        "--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}']


def test_vllm_serve_args_serve_the_topology_name_on_loopback(tmp_path):
    args = vllm_serve_args(PD, "decode", tmp_path, 8123)
    assert args[:6] == ["serve", str(tmp_path), "--host", "127.0.0.1", "--port", "8123"]
    assert args[args.index("--served-model-name") + 1] == "cpu-pd-1p1-1d1"
    assert "--kv-transfer-config" in args and "--enforce-eager" in args


def test_vllm_serve_env_gives_gpus_to_gpu_topologies_only():
    cpu = vllm_serve_env(CPU, side_channel_port=5001, devices=["3"])
    assert "CUDA_VISIBLE_DEVICES" not in cpu and cpu["VLLM_TARGET_DEVICE"] == "cpu"
    assert cpu["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5001" and cpu["VLLM_SERVER_DEV_MODE"] == "1"
    assert vllm_serve_env(GPU, side_channel_port=5002, devices=["2", "5"])["CUDA_VISIBLE_DEVICES"] == "2,5"


def test_engine_env_lets_the_topology_win():
    t = Topology(name="x", kind="collocated", device="cpu", model="m", collocated={"tp": 1},
                 env={"UCX_NET_DEVICES": "eth0"})
    env = engine_env(t, local=True)
    assert env["UCX_NET_DEVICES"] == "eth0" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert "VLLM_HOST_IP" not in engine_env(t, local=False)


# -- the GPU ledger: handed in, fed by the caller's CUDA_VISIBLE_DEVICES --------------------------

def test_vllm_backend_gpu_ledger_never_hands_one_gpu_to_two_live_deployments():
    """4x H100: a PD topology and its collocated reference both started on GPU 0 before the ledger."""
    ledger = GpuLedger(["2", "3", "5", "7"])  # this process's CUDA_VISIBLE_DEVICES, not 0..3
    assert ledger.take("pd-1p1-1d1-pack", 2) == ["2", "3"]
    assert ledger.take("colloc-1xtp1", 1) == ["5"]
    with pytest.raises(ClusterError, match=r"colloc-1xtp2: needs 2 GPUs, 1 of 4 free \(held by colloc-1xtp1, "
                                           r"pd-1p1-1d1-pack\); deploy fewer topologies at once"):
        ledger.take("colloc-1xtp2", 2)
    ledger.release("pd-1p1-1d1-pack")
    assert ledger.take("colloc-1xtp2", 2) == ["2", "3"]


def test_ledger_devices_come_from_the_value_passed_in(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # the process's: not read deep down
    assert visible_gpus("4, 6") == ["4", "6"] and visible_gpus("") == []
    assert GpuLedger(cuda_visible_devices="4,6").devices() == ["4", "6"]
