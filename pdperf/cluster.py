"""The cluster as the suite sees it: nodes, GPUs, EFA, and a hardware fingerprint.

Placement and skip decisions are made from these plain records, so the logic is tested
against fake node lists (1x8 GPUs, 2x8 GPUs, uneven nodes, a CPU-only head) and fake
sysfs trees; only ``nodes_from_ray`` and ``efa_by_node`` touch a live Ray cluster.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    gpus: int = 0
    cpus: float = 0.0
    gpu_model: str | None = None  # Ray's accelerator_type, e.g. "H100"
    efa_devices: int = 0
    # EFA domains libfabric lists (``fi_info -p efa``): what NIXL's LIBFABRIC backend can use;
    # None where fi_info is not installed on the node
    efa_libfabric_domains: int | None = None
    is_head: bool = False
    memory_gb: float = 0.0

    @property
    def has_efa(self) -> bool:
        return self.efa_devices > 0


def detect_efa(sysfs: Path = Path("/sys")) -> list[str]:
    """Names of EFA devices under ``sysfs`` (``class/infiniband/<dev>`` bound to the ``efa`` driver)."""
    ib = Path(sysfs) / "class" / "infiniband"
    if not ib.is_dir():
        return []
    found = []
    for dev in sorted(ib.iterdir()):
        driver = dev / "device" / "driver"
        name = os.path.basename(os.path.realpath(driver)) if driver.exists() else ""
        if name == "efa":
            found.append(dev.name)
    return found


_FI_PROVIDER = re.compile(r"^\s*provider:\s*(\S+)")
_FI_DOMAIN = re.compile(r"^\s*domain:\s*(\S+)")


def parse_fi_info(text: str, provider: str = "efa") -> list[str]:
    """Domains ``fi_info`` lists for ``provider`` (each device once per endpoint type: rdmap16s27-rdm,
    rdmap16s27-dgrm), in order, without repeats."""
    found: dict[str, None] = {}
    current = None
    for line in text.splitlines():
        m = _FI_PROVIDER.match(line)
        if m:
            current = m.group(1).split(";")[0]
            continue
        m = _FI_DOMAIN.match(line)
        if m and current == provider:
            found.setdefault(m.group(1), None)
    return list(found)


FI_INFO_PATHS = ("fi_info", "/opt/amazon/efa/bin/fi_info")


def efa_libfabric_domains() -> int | None:
    """RDM EFA domains libfabric sees on this node (``fi_info -p efa -t FI_EP_RDM``); None without fi_info."""
    import shutil
    import subprocess

    exe = next((shutil.which(p) for p in FI_INFO_PATHS if shutil.which(p)), None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-p", "efa", "-t", "FI_EP_RDM"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return len(parse_fi_info(out.stdout))  # exit status 61 (FI_ENODATA) with no output: none


def nodes_from_ray_state(raw_nodes: Iterable[dict[str, Any]], efa: dict[str, int] | None = None,
                         efa_libfabric: dict[str, int | None] | None = None) -> list[NodeInfo]:
    """Turn ``ray.nodes()`` output into NodeInfo records (alive nodes only)."""
    efa = efa or {}
    efa_libfabric = efa_libfabric or {}
    out = []
    for n in raw_nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        model = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        out.append(NodeInfo(
            node_id=n["NodeID"], ip=n["NodeManagerAddress"], gpus=int(res.get("GPU", 0)),
            cpus=float(res.get("CPU", 0)), gpu_model=model, efa_devices=efa.get(n["NodeID"], 0),
            efa_libfabric_domains=efa_libfabric.get(n["NodeID"]),
            is_head=bool(res.get("node:__internal_head__")),
            memory_gb=round(float(res.get("memory", 0)) / 2**30, 1)))
    return sorted(out, key=lambda x: (not x.is_head, x.ip, x.node_id))


def efa_by_node(nodes: list[NodeInfo]) -> dict[str, tuple[int, int | None]]:
    """EFA devices in sysfs and EFA domains libfabric lists, on every node (a Ray task pinned per node)."""
    import sys

    import ray
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Ship this module's code with the task: the cluster's workers need not have pdperf installed.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0)
    def _count() -> tuple[int, int | None]:
        return len(detect_efa()), efa_libfabric_domains()

    refs = {n.node_id: _count.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
            for n in nodes}
    return {nid: ray.get(ref, timeout=60) for nid, ref in refs.items()}


def nodes_from_ray() -> list[NodeInfo]:
    import ray

    nodes = nodes_from_ray_state(ray.nodes())
    efa = efa_by_node(nodes)
    return nodes_from_ray_state(ray.nodes(), {k: v[0] for k, v in efa.items()}, {k: v[1] for k, v in efa.items()})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class ClusterShape:
    """What a baseline's numbers depend on: the hardware, not the hostnames."""

    nodes: list[NodeInfo] = field(default_factory=list)
    cpu_model: str = ""
    cpu_cores: int = 0

    @property
    def gpu_nodes(self) -> list[NodeInfo]:
        return [n for n in self.nodes if n.gpus > 0]

    @property
    def hardware_id(self) -> str:
        gpu_nodes = self.gpu_nodes
        if not gpu_nodes:
            return f"cpu-{self.cpu_cores}c-{_slug(self.cpu_model) or 'unknown'}"
        models = sorted({n.gpu_model or "gpu" for n in gpu_nodes})
        per_node = sorted({n.gpus for n in gpu_nodes})
        hid = f"{_slug('+'.join(models))}-x{'+'.join(str(g) for g in per_node)}"
        if len(gpu_nodes) > 1:
            hid += f"-n{len(gpu_nodes)}"
        if all(n.has_efa for n in gpu_nodes):
            hid += "-efa"
        return hid


def local_cpu() -> tuple[str, int]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model, len(os.sched_getaffinity(0))
