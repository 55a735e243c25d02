"""The environment fingerprint stored with every result and baseline.

Numbers are only comparable on the same hardware and stack, so every result carries what
it ran on: the hardware id (the key of the baseline store), the nodes, GPUs, EFA, the
versions of ray / vllm / nixl / torch / UCX, the UCX and NIXL settings in force, the git
commit of the suite, and what tells two machines of one kind apart: the driver's host name and
its GPUs' driver version, power limit and maximum clocks (4x H100, sessions 3 and 5: the same
fingerprint otherwise, the same topology 1.6x slower per token; nothing recorded could say
whether the machine or its settings differed).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from pdperf import compat
from pdperf.backends.base import Endpoint
from pdperf.cluster import ClusterShape
from pdperf.specs import Topology, Workload

ENV_PREFIXES = ("UCX_", "NIXL_", "FI_", "VLLM_NIXL", "NCCL_")


def git_sha(root: Path, override: str | None = None) -> str | None:
    """The commit measured (``-dirty`` with uncommitted changes). ``override`` wins (PDPERF_GIT_SHA,
    read by the session's options): a copy of the tree whose ``.git`` does not match it (the GPU
    test machines' copy lagged a session)."""
    if override and override.strip():
        return override.strip()
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip() if out.returncode == 0 else None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}-dirty" if sha and dirty else sha
    except (OSError, subprocess.TimeoutExpired):
        return None


def ucx_version() -> str | None:
    try:
        out = subprocess.run(["ucx_info", "-v"], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            if "version" in line.lower():
                return line.strip("# ").strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


GPU_QUERY = {  # nvidia-smi --query-gpu field -> fingerprint key
    "driver_version": "gpu_driver",
    "power.limit": "gpu_power_limit_w",
    "clocks.max.sm": "gpu_max_sm_clock_mhz",
    "clocks.max.memory": "gpu_max_mem_clock_mhz",
    "persistence_mode": "gpu_persistence_mode",
}


def gpu_facts(timeout_s: float = 20.0) -> dict[str, str]:
    """This host's GPU settings, one value per key ("a, b" where its GPUs differ); {} without nvidia-smi.

    Only settings that stay put (no current clocks or temperatures): the gate notes every key that
    differs from the baseline's, and a note must mean something changed.
    """
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_QUERY)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    rows = [r for r in rows if len(r) == len(GPU_QUERY)]
    if out.returncode != 0 or not rows:
        return {}
    facts = {}
    for i, key in enumerate(GPU_QUERY.values()):
        values = sorted({r[i] for r in rows if r[i] and "N/A" not in r[i] and "Not Supported" not in r[i]})
        if values:
            facts[key] = ", ".join(values)
    return facts


def fingerprint(shape: ClusterShape, *, backend: str, root: Path, extra: dict[str, Any] | None = None,
                git_sha_override: str | None = None) -> dict[str, Any]:
    gpu_nodes = shape.gpu_nodes
    env = {
        "hardware_id": shape.hardware_id,
        "backend": backend,
        "nodes": len(shape.nodes),
        "gpu_nodes": len(gpu_nodes),
        "gpus": sum(n.gpus for n in gpu_nodes),
        "gpu_model": ", ".join(sorted({n.gpu_model or "?" for n in gpu_nodes})) or None,
        "gpus_per_node": [n.gpus for n in gpu_nodes],
        "efa": {n.ip: n.efa_devices for n in gpu_nodes} if gpu_nodes else {},
        "cpu_model": shape.cpu_model,
        "cpu_cores": shape.cpu_cores,
        "python": platform.python_version(),
        "ray": compat.version("ray"),
        "vllm": compat.version("vllm"),
        "nixl": compat.version("nixl"),
        "torch": compat.version("torch"),
        "ucx": ucx_version(),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "git_sha": git_sha(root, git_sha_override),
    }
    if gpu_nodes:  # (CPU runs: CI's container names change every run, and would be noted every time)
        env["host"] = platform.node() or None  # the driver's: where the load generator ran
        env.update(gpu_facts())
    env.update(extra or {})
    return env


def point_environment(fingerprint: dict[str, Any], endpoint: Endpoint, *, pool: Any = None,
                      engine_overrides: dict[str, Any] | None = None, workload: Workload | None = None
                      ) -> dict[str, Any]:
    """The environment recorded with a point: the session's fingerprint and the deployment's own."""
    from pdperf.loadgen.runner import request_options

    env = dict(fingerprint)
    # eager engines decode 3-5x slower than the compiled ones users run: a band never mixes the two
    env["engine_mode"] = engine_mode(endpoint.topology)
    if workload is not None:  # what the requests asked of the server (temperature, per-chunk usage)
        env["request_options"] = json.dumps(request_options(workload), sort_keys=True)
    # A replica that restarted while the deployment started (H100: two engines raced for one
    # torch.distributed port) says nothing about the load that follows: recorded with the
    # environment and in the report's start-up table, not as a flag that would refuse a baseline.
    env.update({"topology_kind": endpoint.topology.kind, "backend": endpoint.backend,
                "startup_s": round(endpoint.startup_s, 1), "restarts_at_startup": endpoint.restarts_at_ready,
                **{f"deploy_{k}": v for k, v in endpoint.details.items() if isinstance(v, (str, int, float))}})
    beside = co_resident(pool, endpoint.name, endpoint.neighbours())
    if beside:  # absent when alone, as in baselines recorded before the key: no note between lone points
        env["co_resident"] = beside
    if engine_overrides:  # --engine-arg: a gate against a baseline without them notes the difference
        env["engine_overrides"] = json.dumps(engine_overrides, sort_keys=True)
    if endpoint.model:  # the served model (--model changes it): a note when it differs, and no band mixes two
        env["model"] = endpoint.model
    return env


def engine_mode(topology: Topology) -> str:
    """"eager" (no torch.compile, no CUDA graphs: the CPU stack, or enforce_eager) or "compiled" (vLLM's default)."""
    eager = topology.device == "cpu" or bool(topology.engine_kwargs.get("enforce_eager"))
    return "eager" if eager else "compiled"


def co_resident(pool: Any, name: str, seen: list[str] | None = None) -> str:
    """The other deployments up while ``name`` is measured, sorted and comma-separated ("" when
    none): the pool's, and ``seen``, those the backend sees (Serve apps another run kept up).
    Recorded with each point: on 4x H100 the same collocated topology had ITL x1.8 at c1 with an
    idle PD app up beside it against a run alone (cause unproven)."""
    names = set(seen or [])
    if pool is not None:
        names.update(pool.alive())
    names.discard(name)
    return ",".join(sorted(names))
