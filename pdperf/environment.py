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

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from pdperf import compat
from pdperf.cluster import ClusterShape

ENV_PREFIXES = ("UCX_", "NIXL_", "FI_", "VLLM_NIXL", "NCCL_")


def git_sha(root: Path) -> str | None:
    """The commit measured (``-dirty`` with uncommitted changes). PDPERF_GIT_SHA wins: a copy of
    the tree whose ``.git`` does not match it (the GPU test machines' copy lagged a session)."""
    if os.environ.get("PDPERF_GIT_SHA"):
        return os.environ["PDPERF_GIT_SHA"].strip()
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


def fingerprint(shape: ClusterShape, *, backend: str, root: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "git_sha": git_sha(root),
    }
    if gpu_nodes:  # (CPU runs: CI's container names change every run, and would be noted every time)
        env["host"] = platform.node() or None  # the driver's: where the load generator ran
        env.update(gpu_facts())
    env.update(extra or {})
    return env
