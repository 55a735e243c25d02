"""Each Ray Serve LLM replica picks its own torch.distributed store port (pdperf/backends/ray_replica.py).

On 4x H100 (vLLM 0.26 RayExecutorV2) two replicas of ``colloc-2xtp1`` scanned from the same
base, both found the first port free and one died binding it (EADDRINUSE; Serve restarted it,
+150 s). The wrapped server classes must keep Ray's names, run Ray's own ``__init__``, and reach
a Ray worker that cannot import pdperf (every node of a real cluster but the driver's).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from pdperf.backends import ray_replica

pytestmark = pytest.mark.selftest


class FakeServer:
    """Stands in for Ray's LLMServer: an async __init__ that records what it saw."""

    async def __init__(self, llm_config, *, prefill_server=None):
        self.seen = (llm_config, prefill_server, os.environ.get("VLLM_DP_MASTER_PORT"))


def test_choose_base_only_where_the_role_asked_for_it():
    env = {"VLLM_DP_MASTER_PORT": "23000"}
    assert ray_replica.choose_tcpstore_base(env) is None and env["VLLM_DP_MASTER_PORT"] == "23000"
    env[ray_replica.MARK] = ray_replica.MARK_VALUE
    base = ray_replica.choose_tcpstore_base(env)
    assert env["VLLM_DP_MASTER_PORT"] == str(base)
    start = base + ray_replica.SCAN_OFFSET
    assert 0 < start and start + ray_replica.SCAN_WINDOW <= 65535  # vLLM scans start .. start + 31


def test_bases_differ_between_replicas_starting_together():
    """What the per-role base could not give: two picks in a row are different ports."""
    bases = {ray_replica.free_scan_base() for _ in range(20)}
    assert len(bases) >= 19


def test_wrapped_class_keeps_the_name_and_runs_the_servers_init(monkeypatch):
    monkeypatch.setenv(ray_replica.MARK, ray_replica.MARK_VALUE)
    monkeypatch.setenv("VLLM_DP_MASTER_PORT", "23000")
    cls = ray_replica.own_port(FakeServer)
    assert cls.__name__ == "FakeServer" and issubclass(cls, FakeServer)  # Serve names it "FakeServer:<model>"
    obj = cls.__new__(cls)
    asyncio.run(obj.__init__("cfg", prefill_server="p"))
    config, prefill, port = obj.seen
    assert (config, prefill) == ("cfg", "p")
    assert port != "23000" and port == os.environ["VLLM_DP_MASTER_PORT"]


def test_wrapped_class_reaches_a_worker_that_cannot_import_pdperf(tmp_path):
    """Pickled by value as the ray backend ships it: loads and works where ``import pdperf`` fails."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    cloudpickle.register_pickle_by_value(ray_replica)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FakeServer: a stand-in for Ray's class
    blob = tmp_path / "cls.pkl"
    blob.write_bytes(cloudpickle.dumps(ray_replica.own_port(FakeServer)))
    child = textwrap.dedent(f"""
        import asyncio, os, sys
        class NoPdperf:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pdperf", "tests"):
                    raise ImportError("no pdperf on this worker")
        sys.meta_path.insert(0, NoPdperf())
        import ray.cloudpickle as cp
        cls = cp.loads(open({str(blob)!r}, "rb").read())
        os.environ[{ray_replica.MARK!r}] = {ray_replica.MARK_VALUE!r}
        obj = cls.__new__(cls)
        asyncio.run(obj.__init__("cfg"))
        print(cls.__name__, obj.seen[2])
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    name, port = out.stdout.split()[-2:]
    assert name == "FakeServer" and int(port) > 0


def test_pd_builder_uses_the_wrapped_classes_only_while_building():
    pytest.importorskip("ray.llm._internal.serve.serving_patterns.prefill_decode.builder")
    from ray.llm._internal.serve.serving_patterns.prefill_decode import builder

    from pdperf import compat

    before = (builder.PDPrefillServer, builder.PDDecodeServer)
    with compat.pd_server_classes(ray_replica.own_port) as wrapped:
        assert wrapped
        assert builder.PDPrefillServer is not before[0] and issubclass(builder.PDPrefillServer, before[0])
        assert builder.PDDecodeServer.__name__ == "PDDecodeServer"
    assert (builder.PDPrefillServer, builder.PDDecodeServer) == before


def _ray_llm_config(**runtime_env_vars):
    llm = pytest.importorskip("ray.serve.llm")
    return llm.LLMConfig(model_loading_config={"model_id": "m", "model_source": "/nonexistent/model"},
                         runtime_env={"env_vars": {"VLLM_DP_MASTER_PORT": "23000", **runtime_env_vars}})


def _task_env(llm_config, monkeypatch) -> dict:
    """The env_vars of the Ray task that builds vLLM's config on a GPU (Ray's own code builds them:
    LLMConfig.get_or_create_callback -> CallbackCtx.runtime_env, used by VLLMEngine for that task)."""
    engine_config = llm_config.get_engine_config()
    monkeypatch.setattr(type(engine_config), "get_or_create_pg", lambda self: None)  # no cluster here
    return llm_config.get_or_create_callback().ctx.runtime_env["env_vars"]


@pytest.mark.parametrize("cached_on_driver", [True, False], ids=["engine-config-cached", "not-cached"])
def test_port_reaches_the_task_that_builds_the_engine_config(monkeypatch, cached_on_driver):
    """Fifth GPU session: with only os.environ set, colloc-2xtp1 still raced on base + 100 (the
    engine's config is built in a Ray task with the engine config's runtime_env)."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    config = _ray_llm_config()
    if cached_on_driver:
        config.get_engine_config()  # the app builder does this on the driver; the cache is pickled along
    replica_copy = cloudpickle.loads(cloudpickle.dumps(config))  # what a replica receives
    assert ray_replica.pin_in_llm_config(replica_copy, 41000)[:1] == ["llm_config"]
    assert _task_env(replica_copy, monkeypatch)["VLLM_DP_MASTER_PORT"] == "41000"
    assert config.runtime_env["env_vars"]["VLLM_DP_MASTER_PORT"] == "23000"  # the driver's copy untouched


def test_port_reaches_a_callback_context_made_before(monkeypatch):
    config = _ray_llm_config()
    assert _task_env(config, monkeypatch)["VLLM_DP_MASTER_PORT"] == "23000"
    assert "callback_ctx" in ray_replica.pin_in_llm_config(config, 41000)
    assert _task_env(config, monkeypatch)["VLLM_DP_MASTER_PORT"] == "41000"


def test_wrapped_class_pins_the_port_in_the_config_it_passes_on(monkeypatch):
    monkeypatch.setenv(ray_replica.MARK, ray_replica.MARK_VALUE)
    monkeypatch.setenv("VLLM_DP_MASTER_PORT", "23000")  # restored afterwards (the wrapper sets it)
    config = _ray_llm_config()
    cls = ray_replica.own_port(FakeServer)
    obj = cls.__new__(cls)
    asyncio.run(obj.__init__(config))
    passed, _, port = obj.seen
    assert passed is config and config.runtime_env["env_vars"]["VLLM_DP_MASTER_PORT"] == port != "23000"
    obj = cls.__new__(cls)
    asyncio.run(obj.__init__(llm_config=config))  # by keyword, as the PD decode server may be built
    assert config.runtime_env["env_vars"]["VLLM_DP_MASTER_PORT"] == obj.seen[2]
