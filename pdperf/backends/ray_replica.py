"""A torch.distributed store port of its own for every Ray Serve LLM replica (vLLM 0.26 RayExecutorV2).

vLLM 0.26's Ray executor puts an engine's TCPStore on the first free port from
``VLLM_DP_MASTER_PORT + 100``: every engine with the same value tests the same port, finds it
free, and all but one die with ``DistNetworkError … EADDRINUSE`` when they bind it seconds later
(4x H100: a PD prefill failed three times in a row and Serve gave its application up; two replicas
of ``colloc-2xtp1`` raced and one restarted, +150 s). The ray backend's ``runtime_env`` can only set
one value per deployment, so replicas of one deployment still shared it. ``own_port(cls)`` is the
server class with one more step before the engine starts: in its own process each replica asks the
OS for a free port, the way vLLM does where it has no base, and makes that the scan's start.

Where the value must go (Ray 2.58 and 2.60, ``VLLMEngine._prepare_engine_config``): on a GPU the
replica does not build vLLM's config itself but in a Ray task with the *engine config's*
``runtime_env`` (on CPU it builds it in process). That task's environment is the one vLLM reads
``VLLM_DP_MASTER_PORT`` from, so the replica's ``os.environ`` alone is not enough: the fifth
GPU session's ``colloc-2xtp1`` still raced on the per-role base (EADDRINUSE on port base + 100)
while only ``os.environ`` was set. ``pin_in_llm_config`` writes the port into the LLMConfig's
runtime_env, its cached engine config's and its callback context's, where that task's comes from.

This module imports nothing of pdperf: the ray backend registers it to be pickled by value, so a
Ray worker that cannot import pdperf (any node of a real cluster) still gets these classes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

# Set in a role's runtime_env when the topology sets no VLLM_DP_MASTER_PORT of its own.
MARK = "PDPERF_TCPSTORE_PORT"
MARK_VALUE = "per-replica"
SCAN_OFFSET = 100  # vLLM: start = VLLM_DP_MASTER_PORT + 100 + local_dp_rank * 32
SCAN_WINDOW = 32


def free_scan_base(tries: int = 20) -> int:
    """A VLLM_DP_MASTER_PORT whose scan starts at a port the OS just called free (below 65536 - 32)."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if SCAN_OFFSET <= port <= 65535 - SCAN_WINDOW:
            return port - SCAN_OFFSET
    raise RuntimeError(f"no free port below {65535 - SCAN_WINDOW} after {tries} tries")


def choose_tcpstore_base(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set VLLM_DP_MASTER_PORT for this process's engine where the role asked for it; returns the value."""
    # looked up at call time: a default argument would be pickled, by value, as a copy
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    if env.get(MARK) != MARK_VALUE:
        return None
    base = free_scan_base()
    env["VLLM_DP_MASTER_PORT"] = str(base)
    return base


def pin_in_llm_config(llm_config, base: int) -> list[str]:
    """Put ``VLLM_DP_MASTER_PORT=base`` where Ray Serve LLM builds the engine's runtime_env from.

    ``llm_config`` is Ray's LLMConfig as the replica received it (unpickled: its cached engine
    config and callback, where the driver made them, came along). Returns the places set (for the
    replica's log); anything without a runtime_env is left alone.
    """
    places = []
    engine = getattr(llm_config, "_engine_config", None)
    ctx = getattr(getattr(llm_config, "_callback_instance", None), "ctx", None)
    for name, holder in (("llm_config", llm_config), ("engine_config", engine), ("callback_ctx", ctx)):
        if holder is None or not hasattr(holder, "runtime_env"):
            continue
        runtime_env = holder.runtime_env
        if runtime_env is None:
            if name != "llm_config":
                continue  # rebuilt from llm_config's when needed
            holder.runtime_env = runtime_env = {}
            runtime_env = holder.runtime_env  # a validating model may store a copy
        env_vars = runtime_env.get("env_vars")
        if env_vars is None:
            env_vars = runtime_env["env_vars"] = {}
        env_vars["VLLM_DP_MASTER_PORT"] = str(base)
        places.append(name)
    return places


def own_port(cls: type) -> type:
    """``cls`` (a Ray Serve LLM server class, async ``__init__``) choosing its TCPStore base first.

    Same name, so Serve's deployment names ("LLMServer:<model>") do not change.
    """

    async def __init__(self, *args, **kwargs):
        base = choose_tcpstore_base()
        if base is not None:
            llm_config = args[0] if args else kwargs.get("llm_config")
            places = pin_in_llm_config(llm_config, base) if llm_config is not None else []
            print(f"pdperf: this replica's torch.distributed store scan starts at port {base + SCAN_OFFSET} "
                  f"(set in os.environ{''.join(', ' + p + '.runtime_env' for p in places)})", flush=True)
        await cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
