"""vLLM engine configuration, one place for both backends.

The ray backend hands vLLM its engine arguments as ``LLMConfig.engine_kwargs``; the vllm backend
as ``vllm serve`` flags. A comparison of the two (what Ray itself costs) only means something
when both engines are configured alike, so the arguments, the engine's environment and their
translation into flags are built here, from the topology, and nowhere else. ``--engine-arg``
overrides are parsed and laid over every topology here too, so that what a point records as its
overrides is exactly what the engines got.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pdperf import compat
from pdperf.errors import SpecError
from pdperf.models import has_weights
from pdperf.specs import Topology

# A local head (and the vllm backend) keeps every engine on loopback: NIXL's side channel and UCX
# would otherwise pick the machine's first interface, which a CI container may not route.
LOOPBACK_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
    "UCX_NET_DEVICES": "lo",
}
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}


def engine_env(t: Topology, local: bool) -> dict[str, str]:
    """Environment variables an engine of ``t`` starts with (the topology's own ``env`` wins)."""
    env: dict[str, str] = {}
    if local:
        env.update(LOOPBACK_ENV)
    if t.device == "cpu":
        env.update(CPU_ENV)
    if t.kind == "pd":
        # UCX prints the protocol and transport it selects (once per selection, a small table in the
        # engine's output): the suite reads which transport moved the KV from it (pdperf.network)
        env["UCX_PROTO_INFO"] = "y"
    if t.ucx_tls:
        env["UCX_TLS"] = t.ucx_tls
    if t.kv_transport == "LIBFABRIC":
        env.setdefault("FI_PROVIDER", "efa")
    env.update(t.env)
    return env


def engine_kwargs(t: Topology, role: str, model_path: Path) -> dict[str, Any]:
    """vLLM engine arguments of one role: the same for the ray and the vllm backend."""
    r = t.roles()[role]
    kwargs: dict[str, Any] = {"tensor_parallel_size": r.tp, "max_model_len": t.max_model_len}
    if t.device == "cpu":
        kwargs.update({"enforce_eager": True, "dtype": "float32"})
    if t.device == "gpu" and r.gpu_fraction < 1:  # engines sharing a GPU split its memory (vLLM's default: 0.9)
        kwargs["gpu_memory_utilization"] = round(0.9 * r.gpu_fraction, 3)
    if not has_weights(model_path):
        kwargs["load_format"] = "dummy"
    if t.kind == "pd":
        kwargs["kv_transfer_config"] = compat.nixl_kv_transfer_config(role, t.device, t.kv_transport, t.kv_connector)
    kwargs.update(t.engine_kwargs)
    return kwargs


def vllm_serve_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine arguments as ``vllm serve`` flags (``max_num_seqs=8`` -> ``--max-num-seqs 8``)."""
    out: list[str] = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:  # vLLM's boolean flags take --no-X (BooleanOptionalAction); dropping it would
            out.append("--no-" + flag[2:])  # leave a default of True (enable_prefix_caching) in place
        elif v is None:
            continue
        elif isinstance(v, (dict, list)):
            out += [flag, json.dumps(v)]
        else:
            out += [flag, str(v)]
    return out


def vllm_serve_args(t: Topology, role: str, model_path: Path, port: int) -> list[str]:
    """The arguments after ``vllm`` that start one engine of ``role`` on ``127.0.0.1:port``; it serves
    the topology's name, as a Ray deployment does, so requests carry the same model id on both."""
    kwargs = {"served_model_name": t.name, **engine_kwargs(t, role, model_path)}
    return ["serve", str(model_path), "--host", "127.0.0.1", "--port", str(port)] + vllm_serve_flags(kwargs)


def vllm_serve_env(t: Topology, *, side_channel_port: int, devices: list[str] | None = None) -> dict[str, str]:
    """What one ``vllm serve`` engine's environment adds to the parent's: the engine environment on
    loopback, a NIXL side-channel port of its own, and its GPUs (``devices``; GPU topologies only)."""
    env = engine_env(t, local=True)
    env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /reset_prefix_cache, used between load points
    if t.device == "gpu" and devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


# -- --engine-arg ----------------------------------------------------------------------------------

def parse_engine_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--engine-arg KEY=VALUE`` items as a dict; VALUE is parsed as YAML (true, 128, {level: 0})."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"--engine-arg {item!r}: expected KEY=VALUE with a vLLM engine argument name as KEY, "
                            "e.g. --engine-arg enforce_eager=true")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--engine-arg {item!r}: VALUE is not valid YAML ({str(e).splitlines()[0]}); quote it, "
                            "e.g. --engine-arg 'compilation_config={level: 0}'") from None
        out = deep_merge(out, {key: value})
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``; where both hold a dict under one key, merged key by key (so
    ``compilation_config={level: 0}`` keeps another override's ``pass_config``)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def with_engine_overrides(t: Topology, overrides: dict[str, Any]) -> Topology:
    """The topology with ``overrides`` laid over its engine_kwargs (the topology itself if none)."""
    if not overrides:
        return t
    return t.model_copy(update={"engine_kwargs": deep_merge(t.engine_kwargs, overrides)})
