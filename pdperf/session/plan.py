"""What a session runs, decided from plain data: options, spec files, the cluster's nodes.

Which topologies and workloads are selected, the sweep cases (topology x workload x point, each
with an id that carries its coordinates), why a topology cannot run here, which collocated
topology a PD one's greedy output is checked against, which tests must share a pytest-xdist
worker, which topologies start side by side, and the order tests run in. No I/O, no Ray, no
environment: the planner is a function of its inputs, so every one of these decisions is
unit-tested with fake node lists (tests/selftest/test_session_plan.py), and the pytest plugin
only wires the answers in.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from pdperf.cluster import NodeInfo
from pdperf.placement import plan as place
from pdperf.session.options import SessionOptions, SpecSet
from pdperf.specs import Topology, Workload

# Skip reasons shared by many topologies. They do not name the topology (the test id does): tests
# skipped for one reason then read alike, and pytest's -ra summary folds them into one line.
GPU_TOPOLOGY_ON_CPU_RUN = "needs GPUs; this run is --device cpu"
CPU_TOPOLOGY_ON_GPU_RUN = "embedded-CPU topology; run it with --device cpu"
VLLM_BACKEND_SINGLE_NODE = "the vllm backend is single-node; 'spread' needs --backend ray"


@dataclass(frozen=True)
class SweepCase:
    topology: Topology
    workload: Workload
    point: float
    requests: int

    @property
    def point_id(self) -> str:
        return self.workload.sweep.point_id(self.point)

    @property
    def id(self) -> str:
        return f"{self.topology.name}/{self.workload.name}/{self.point_id}"


@dataclass(frozen=True)
class Skip:
    """Why ``topology`` cannot run in this session; ``reason`` without the topology's name."""

    topology: str
    reason: str

    @property
    def message(self) -> str:
        """The reason as a sentence of its own, naming the topology."""
        return f"topology {self.topology}: {self.reason}"


@dataclass(frozen=True)
class OutcomeGroup:
    """Topologies that share an outcome: ``reason`` None for those that run."""

    reason: str | None
    names: tuple[str, ...]


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def resolve_device(requested: Literal["auto", "cpu", "gpu"], nodes: tuple[NodeInfo, ...]) -> Literal["cpu", "gpu"]:
    """--device auto: gpu when any node of the cluster has a GPU, else cpu."""
    if requested != "auto":
        return requested
    return "gpu" if any(n.gpus for n in nodes) else "cpu"


def external_topology(options: SessionOptions) -> Topology:
    """The stand-in topology of --backend external when no --topology names one: one collocated engine
    whose tokenizer is --tokenizer (or the CPU stack's)."""
    return Topology(name="external", kind="collocated", device="cpu", model=options.tokenizer or "tiny-llama",
                    collocated={"replicas": 1, "tp": 1}, description=f"external server at {options.external_url}")


@dataclass(frozen=True)
class SessionPlan:
    """The session's decisions. Build it with ``make_plan``; every method is a pure function of the fields."""

    options: SessionOptions
    specs: SpecSet
    nodes: tuple[NodeInfo, ...]
    device: Literal["cpu", "gpu"]  # --device, "auto" resolved from the nodes

    # -- selection -------------------------------------------------------------------------------
    def topologies(self, kind: str | None = None, tag: str | None = None) -> list[Topology]:
        """The topologies the session's tests are parametrized over (--topology; all by default),
        of ``kind`` and carrying ``tag`` if given. A topology tagged ``network-only`` (a deliberately
        broken KV path, such as UCX forced to TCP) is only for tests that ask for the network tag."""
        patterns = self.options.topology_patterns
        if self.options.backend == "external":
            picked = [t for n, t in self.specs.topologies.items() if patterns and _match(n, patterns)]
            topos = picked[:1] or [external_topology(self.options)]
        else:
            topos = [t for n, t in sorted(self.specs.topologies.items()) if _match(n, patterns)]
        return [t for t in topos if (kind is None or t.kind == kind) and (tag is None or tag in t.tags)
                and ("network-only" not in t.tags or tag == "network")]

    def workloads(self) -> list[Workload]:
        """The workloads selected (--workload) that fit this run's device."""
        return [w for n, w in sorted(self.specs.workloads.items())
                if _match(n, self.options.workload_patterns) and w.device in ("any", self.device)]

    def sweep_cases(self, sweep_kind: str | None = None) -> list[SweepCase]:
        """Every (topology, sweep workload, point) of the session, ``sweep_kind`` (concurrency | rate) only if given."""
        # Topology first: consecutive cases share a deployment (a redeploy costs minutes).
        cases = []
        for t in self.topologies():
            if t.device != self.device and self.options.backend != "external":
                continue
            for w in self.workloads():
                if w.tier != "sweep" or (sweep_kind and w.sweep.kind != sweep_kind) or not _match(t.name, tuple(w.topologies)):
                    continue
                for p in w.sweep.points:
                    cases.append(SweepCase(t, w, p, w.sweep.scaled_requests_at(p, self.options.requests_scale)))
        return cases

    # -- what cannot run here ---------------------------------------------------------------------
    def skip(self, t: Topology) -> Skip | None:
        """Why ``t`` cannot run in this session, or None."""
        if self.options.backend == "external":
            return None
        if t.device == "cpu" and self.device == "gpu":
            return Skip(t.name, CPU_TOPOLOGY_ON_GPU_RUN)
        # Before placement: on a CPU-only machine each GPU topology's placement reason differs
        # ("needs 2 GPUs, the cluster has 0") and a first run would list every one of them.
        if t.device == "gpu" and self.device == "cpu":
            return Skip(t.name, GPU_TOPOLOGY_ON_CPU_RUN)
        p = place(t, list(self.nodes))
        if not p.feasible:
            return Skip(t.name, (p.reason or "the cluster cannot hold it").removeprefix(f"topology {t.name}: "))
        if self.options.backend == "vllm" and t.nodes_needed > 1:
            return Skip(t.name, VLLM_BACKEND_SINGLE_NODE)
        return None

    def skip_reason(self, t: Topology) -> str | None:
        """``skip(t)`` as a sentence naming the topology (for messages about one topology among others)."""
        s = self.skip(t)
        return s.message if s else None

    def outcome_groups(self, topologies: list[Topology]) -> list[OutcomeGroup]:
        """``topologies`` grouped by outcome, for the collection table: those that run, then one group per
        skip reason in the order of their first topology by name."""
        groups: dict[str | None, list[str]] = {None: []}
        for t in sorted({t.name: t for t in topologies}.values(), key=lambda t: t.name):
            s = self.skip(t)
            groups.setdefault(s.reason if s else None, []).append(t.name)
        return [OutcomeGroup(reason, tuple(names)) for reason, names in groups.items() if names]

    # -- deployments ------------------------------------------------------------------------------
    def served_model(self, t: Topology) -> str:
        """The model ``t``'s engines serve: --model replaces a GPU topology's own."""
        override = self.options.model_override
        return override if override and t.device == "gpu" else t.model

    def reference_for(self, t: Topology) -> Topology | None:
        """The collocated topology whose greedy output a PD topology must reproduce."""
        if t.kind != "pd":
            return None
        assert t.decode is not None
        selected = {s.name for s in self.topologies()}
        candidates = [c for c in self.specs.topologies.values()
                      if c.kind == "collocated" and c.device == t.device and self.served_model(c) == self.served_model(t)
                      and c.collocated is not None and c.collocated.tp == t.decode.tp]
        # Prefer one this session runs anyway (no extra deployment), then the smallest.
        return min(candidates, key=lambda c: (c.name not in selected, c.gpus, c.name), default=None)

    def deployment_group(self, t: Topology) -> str:
        """Tests that share deployments share a group (one pytest-xdist worker each, ``--dist
        loadgroup``): a PD topology goes with the collocated topology its greedy check compares
        against, so two workers never deploy the same Serve application."""
        ref = self.reference_for(t)
        return ref.name if ref is not None else t.name

    def prestart_set(self, planned: list[Topology]) -> list[Topology]:
        """Topologies to start side by side: ``planned`` (those the session's tests will use, in order),
        if they all fit at once (--max-alive and the cluster's GPUs) and --no-prestart is not given."""
        topos = list({t.name: t for t in planned}.values())
        if not self.options.prestart or len(topos) < 2 or len(topos) > self.options.max_alive:
            return []
        if sum(t.gpus for t in topos) > sum(n.gpus for n in self.nodes):
            return []
        return topos

    # -- the cluster, as the table's header says it --------------------------------------------------
    def cluster_description(self) -> str:
        gpu_nodes = [n for n in self.nodes if n.gpus]
        if not gpu_nodes:
            return f"{len(self.nodes)} node(s), no GPU"
        return ", ".join(f"{n.ip}: {n.gpus}x {n.gpu_model or 'GPU'}{' +EFA' if n.has_efa else ''}" for n in gpu_nodes)


def make_plan(options: SessionOptions, specs: SpecSet, nodes: list[NodeInfo] | tuple[NodeInfo, ...]) -> SessionPlan:
    nodes = tuple(nodes)
    return SessionPlan(options=options, specs=specs, nodes=nodes, device=resolve_device(options.device, nodes))


def grouped_order(keys: list[tuple[str, str] | None], last: frozenset[int] = frozenset()) -> list[int]:
    """The order to run tests in, given each one's (deployment group, topology), None for a test that
    uses no deployment: every group's tests together, and within a group each topology's, in the
    order they first appear, those in ``last`` after the rest of their topology's (a test that may
    evict its own topology, e.g. the greedy check's reference on one GPU); a test without a key keeps
    its place among the groups' first tests. Interleaved topologies (pytest orders smoke tests by
    function, then parameter) would make the pool tear down and redeploy whenever they do not all
    fit at once, minutes each on GPUs."""
    first_group: dict[str, int] = {}
    first_topo: dict[tuple[str, str], int] = {}
    sort_keys = []
    for i, k in enumerate(keys):
        if k is None:
            sort_keys.append((i, i, 0, i))
        else:
            sort_keys.append((first_group.setdefault(k[0], i), first_topo.setdefault(k, i), int(i in last), i))
    return sorted(range(len(keys)), key=lambda i: sort_keys[i])
