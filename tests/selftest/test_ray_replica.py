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
