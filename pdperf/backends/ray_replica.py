"""A torch.distributed store port of its own for every Ray Serve LLM replica (vLLM 0.26 RayExecutorV2).

vLLM 0.26's Ray executor puts an engine's TCPStore on the first free port from
``VLLM_DP_MASTER_PORT + 100``: every engine with the same value tests the same port, finds it
free, and all but one die with ``DistNetworkError … EADDRINUSE`` when they bind it seconds later
(4x H100: a PD prefill failed three times in a row and Serve gave its application up; two replicas
of ``colloc-2xtp1`` raced and one restarted, +150 s). The ray backend's ``runtime_env`` can only set
one value per deployment, so replicas of one deployment still shared it. ``own_port(cls)`` is the
server class with one more step before the engine starts: in its own process each replica asks the
OS for a free port, the way vLLM does where it has no base, and makes that the scan's start.

This module imports nothing of pdperf: the ray backend registers it to be pickled by value, so a
Ray worker that cannot import pdperf (any node of a real cluster) still gets these classes.
"""

from __future__ import annotations

import os
import socket

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


def choose_tcpstore_base(environ: dict | None = None) -> int | None:
    """Set VLLM_DP_MASTER_PORT for this process's engine where the role asked for it; returns the value."""
    # looked up at call time: a default argument would be pickled, by value, as a copy
    environ = os.environ if environ is None else environ
    if environ.get(MARK) != MARK_VALUE:
        return None
    base = free_scan_base()
    environ["VLLM_DP_MASTER_PORT"] = str(base)
    return base


def own_port(cls: type) -> type:
    """``cls`` (a Ray Serve LLM server class, async ``__init__``) choosing its TCPStore base first.

    Same name, so Serve's deployment names ("LLMServer:<model>") do not change.
    """

    async def __init__(self, *args, **kwargs):
        base = choose_tcpstore_base()
        if base is not None:
            print(f"pdperf: this replica's torch.distributed store scan starts at port {base + SCAN_OFFSET}",
                  flush=True)
        await cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
