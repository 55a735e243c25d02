"""Placement: where each role's engines go, from the cluster's real nodes.

Ray Serve LLM places each engine replica in a placement group built from its LLMConfig's
``placement_group_config``. Like the reference study, we pin a role to a node by adding
that node's built-in ``node:<ip>`` resource (a tiny amount) to every bundle:

- ``pack``: prefill and decode on one node (KV over NVLink / CUDA IPC);
- ``spread``: prefill on node A, decode on node B (KV over the network: EFA or TCP);
- ``any``: no pinning; each engine's TP group is kept on one node (STRICT_PACK).

``plan`` never talks to Ray: it takes ``NodeInfo`` records and returns either a plan or the
reason the topology cannot be held ("needs 2 GPU nodes, found 1"), which the fixtures turn
into a skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdperf.cluster import NodeInfo
from pdperf.specs import Role, Topology

NODE_RESOURCE_AMOUNT = 0.001


@dataclass(frozen=True)
class RolePlacement:
    role: str
    node_ip: str | None
    placement_group_config: dict[str, Any]


@dataclass(frozen=True)
class PlacementPlan:
    topology: str
    roles: dict[str, RolePlacement] = field(default_factory=dict)
    reason: str | None = None  # set when the cluster cannot hold the topology

    @property
    def feasible(self) -> bool:
        return self.reason is None

    @property
    def nodes(self) -> list[str]:
        return sorted({r.node_ip for r in self.roles.values() if r.node_ip})


def _bundles(role: Role, device: str, node_ip: str | None) -> dict[str, Any]:
    if device == "cpu":
        bundle: dict[str, float] = {"CPU": 1}
        bundles = [dict(bundle) for _ in range(role.tp)]
    else:
        bundles = [{"CPU": 1, "GPU": role.gpu_fraction} for _ in range(role.tp)]
    if node_ip:
        for b in bundles:
            b[f"node:{node_ip}"] = NODE_RESOURCE_AMOUNT
    return {"bundles": bundles, "strategy": "STRICT_PACK"}


def _fits(engines: list[int], capacities: list[int]) -> bool:
    """First-fit decreasing: can engines of these GPU sizes go on nodes of these capacities?"""
    free = sorted(capacities, reverse=True)
    for size in sorted(engines, reverse=True):
        for i, cap in enumerate(free):
            if cap >= size:
                free[i] -= size
                break
        else:
            return False
    return True


def _engines(role: Role) -> list[int]:
    """GPUs per engine, for fitting; engines sharing one GPU count as one engine of one GPU in all
    (the spec allows sharing only when they fit on one GPU together)."""
    return [role.tp] * role.replicas if role.gpu_fraction >= 1 else []


def logical_cpus(t: Topology) -> int:
    """Ray logical CPUs a GPU topology reserves: one per ingress replica (Serve's default), and per
    engine one per GPU bundle plus one for the replica actor (Ray LLM adds it to the first bundle)."""
    return t.ingress_replicas + sum(r.replicas * (r.tp + 1) for r in t.roles().values())


def plan(topology: Topology, nodes: list[NodeInfo]) -> PlacementPlan:
    t = topology
    roles = t.roles()
    infeasible = lambda why: PlacementPlan(t.name, reason=f"topology {t.name}: {why}")  # noqa: E731

    if t.device == "cpu":
        total_cpus = sum(n.cpus for n in nodes)
        if nodes and total_cpus < t.engines:
            return infeasible(f"needs {t.engines} CPU slots for its engines, the cluster has {total_cpus:g}")
        return PlacementPlan(t.name, {name: RolePlacement(name, None, _bundles(r, "cpu", None))
                                      for name, r in roles.items()})

    gpu_nodes = [n for n in nodes if n.gpus > 0]
    total = sum(n.gpus for n in gpu_nodes)
    if total < t.gpus:
        return infeasible(f"needs {t.gpus} GPUs, the cluster has {total}"
                          + (f" on {len(gpu_nodes)} node(s)" if gpu_nodes else " (no GPU node)"))
    need_cpus, have_cpus = logical_cpus(t), sum(n.cpus for n in nodes)
    if have_cpus < need_cpus:
        return infeasible(f"needs {need_cpus} Ray logical CPUs ({t.ingress_replicas} ingress replica(s) and "
                          f"{t.engines} engine(s)), the cluster has {have_cpus:g}: start Ray with more --num-cpus "
                          "(logical CPUs are accounting only) or lower ingress_replicas")
    biggest = max(n.gpus for n in gpu_nodes)
    widest_tp = max(r.tp for r in roles.values())
    if widest_tp > biggest:
        return infeasible(f"needs TP {widest_tp} on one node, the largest node has {biggest} GPUs")
    if t.needs_efa:
        no_efa = [n.ip for n in gpu_nodes if not n.has_efa]
        if len(gpu_nodes) - len(no_efa) < t.nodes_needed:
            return infeasible(f"needs EFA on {t.nodes_needed} GPU node(s); nodes without EFA: {', '.join(no_efa)}")
        gpu_nodes = [n for n in gpu_nodes if n.has_efa]

    # Deterministic choice: most GPUs first, then by IP.
    ordered = sorted(gpu_nodes, key=lambda n: (-n.gpus, n.ip))

    shared = [1] if t.shares_gpu else []  # every engine of a GPU-sharing topology on one GPU
    if t.placement == "any" and not t.shares_gpu:
        all_engines = [s for r in roles.values() for s in _engines(r)]
        if not _fits(all_engines, [n.gpus for n in ordered]):
            return infeasible(f"its engines (GPUs {sorted(all_engines, reverse=True)}) do not fit on nodes with "
                              f"{[n.gpus for n in ordered]} GPUs")
        return PlacementPlan(t.name, {name: RolePlacement(name, None, _bundles(r, "gpu", None))
                                      for name, r in roles.items()})

    if t.placement == "pack" or t.shares_gpu:
        all_engines = shared + [s for r in roles.values() for s in _engines(r)]
        for node in ordered:
            if _fits(all_engines, [node.gpus]):
                return PlacementPlan(t.name, {name: RolePlacement(name, node.ip, _bundles(r, "gpu", node.ip))
                                              for name, r in roles.items()})
        return infeasible(f"placement 'pack' needs {t.gpus} GPUs on one node, the largest node has {biggest}")

    # spread: prefill on one node, decode on another.
    prefill, decode = roles["prefill"], roles["decode"]
    if len(ordered) < 2:
        return infeasible(f"placement 'spread' needs 2 GPU nodes, found {len(ordered)}")
    for a in ordered:
        if not _fits(_engines(prefill), [a.gpus]):
            continue
        for b in ordered:
            if b.node_id != a.node_id and _fits(_engines(decode), [b.gpus]):
                return PlacementPlan(t.name, {
                    "prefill": RolePlacement("prefill", a.ip, _bundles(prefill, "gpu", a.ip)),
                    "decode": RolePlacement("decode", b.ip, _bundles(decode, "gpu", b.ip))})
    return infeasible(f"placement 'spread' needs a node with {prefill.gpus} GPUs for prefill and another with "
                      f"{decode.gpus} for decode; nodes have {[n.gpus for n in ordered]}")
