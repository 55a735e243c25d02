"""What lives as long as a test session: the cluster connection, the deployments, the GPU ledger.

The planner decides from plain data; this object holds the things with a lifetime. One per pytest
process (the controller and each pytest-xdist worker), owned by the session fixtures, handed to
nothing global: the Ray connection is made when a deployment is first needed (or at start with
--ray-address, because the plan needs that cluster's nodes), the ``DeploymentPool`` deploys each
topology once, and the ``GpuLedger`` keeps two ``vllm serve`` deployments of this process off one
GPU. Every deployment comes from the one backend factory (``pdperf.backends.factory``), as
``pdperf serve``'s does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pdperf.backends.base import Deployment
from pdperf.backends.factory import make_deployment, start_cluster
from pdperf.backends.ray_serve import RayCluster
from pdperf.backends.vllm_proc import GpuLedger
from pdperf.cluster import ClusterShape, NodeInfo, detect_efa, local_cpu
from pdperf.lifecycle import DeploymentPool
from pdperf.session.options import SessionOptions, SpecSet
from pdperf.session.plan import SessionPlan, make_plan
from pdperf.specs import Topology, Workload


def local_nodes(sysfs: Path = Path("/sys")) -> list[NodeInfo]:
    """This machine as a one-node cluster (what a local Ray head or the vllm backend will see)."""
    gpus, model = 0, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []
        gpus = len(names)
        if names:
            model = next((tok for tok in names[0].replace("-", " ").split() if tok[:1] in "AHBL" and tok[1:2].isdigit()),
                         names[0])
    except (OSError, subprocess.TimeoutExpired):
        pass
    _, cores = local_cpu()
    return [NodeInfo(node_id="local", ip="127.0.0.1", gpus=gpus, cpus=float(max(cores, 8)), gpu_model=model,
                     efa_devices=len(detect_efa(sysfs)), is_head=True)]


class SessionRuntime:
    """A session's cluster connection, deployment pool and GPU ledger, and its plan.

    The fixtures and tests know it as ``pdperf_ctx``; besides ``plan`` they read a few of the plan's
    answers through it (``all_topologies``, ``skip_reason``...), kept here so that a test asks the
    session, not a module."""

    def __init__(self, options: SessionOptions, plan: SessionPlan, *, cluster: RayCluster | None = None):
        self.options = options
        self.plan = plan
        self.cluster = cluster
        self.backend_options = options.backend_options()
        self.ledger = GpuLedger(cuda_visible_devices=options.env.cuda_visible_devices)
        self.pool: DeploymentPool | None = None  # made by start_pool; kept after close for its start-up records

    @classmethod
    def open(cls, options: SessionOptions, specs: SpecSet, *, nodes: list[NodeInfo] | None = None
             ) -> SessionRuntime:
        """The runtime of a session: with --ray-address (ray backend) connected now, the plan made from that
        cluster's nodes; else from ``nodes``, or this machine's (a local head starts when first needed)."""
        cluster = None
        if nodes is None:
            if options.backend == "ray" and options.ray_address:
                cluster = start_cluster(options.ray_address,
                                        metrics_report_interval_ms=options.env.metrics_report_interval_ms)
                nodes = cluster.nodes()
            else:
                nodes = local_nodes()
        return cls(options, make_plan(options, specs, nodes), cluster=cluster)

    # -- the cluster -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect to (or start) the Ray cluster, once; other backends need none."""
        if self.options.backend != "ray" or self.cluster is not None:
            return
        self.cluster = start_cluster(self.options.ray_address,
                                     metrics_report_interval_ms=self.options.env.metrics_report_interval_ms)

    def disconnect(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.stop()

    def shape(self) -> ClusterShape:
        model, cores = local_cpu()
        return ClusterShape(nodes=list(self.plan.nodes), cpu_model=model, cpu_cores=cores)

    # -- deployments -------------------------------------------------------------------------------
    def deployment_for(self, t: Topology, log_dir: Path) -> Deployment:
        d = make_deployment(self.backend_options, t, log_dir=log_dir, cluster=self.cluster, ledger=self.ledger)
        if self.options.inject_slowdown is not None:  # --inject-slowdown: the same server, slowed (pdperf.inject)
            from pdperf.inject import SlowedDeployment

            d = SlowedDeployment(d, self.options.inject_slowdown)
        return d

    def start_pool(self, log_dir: Path, planned: list[Topology]) -> DeploymentPool:
        """The session's deployment pool (connect first); ``planned`` topologies start side by side
        when the plan says they fit at once."""
        self.pool = DeploymentPool(lambda t: self.deployment_for(t, log_dir), max_alive=self.options.max_alive,
                                   timeout_s=self.options.deploy_timeout_s,
                                   gpu_capacity=sum(n.gpus for n in self.plan.nodes))
        self.pool.prestart(self.plan.prestart_set(planned))
        return self.pool

    def close(self) -> list[str]:
        """Tear every deployment down and disconnect; the teardown errors met (a failing disconnect raises)."""
        errors = self.pool.close() if self.pool is not None else []
        self.disconnect()
        return errors

    # -- the plan's answers, as tests ask them -----------------------------------------------------
    @property
    def backend(self) -> str:
        return self.options.backend

    @property
    def engine_overrides(self) -> dict:
        return self.options.engine_overrides

    @property
    def git_sha(self) -> str | None:
        """PDPERF_GIT_SHA: the commit to record instead of the tree's own ``.git``'s, when set."""
        return self.options.env.git_sha

    @property
    def requests_scale(self) -> float:
        return self.options.requests_scale

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def nodes(self) -> list[NodeInfo]:
        return list(self.plan.nodes)

    @property
    def all_topologies(self) -> dict[str, Topology]:
        return dict(self.plan.specs.topologies)

    @property
    def all_workloads(self) -> dict[str, Workload]:
        return dict(self.plan.specs.workloads)

    def skip_reason(self, t: Topology) -> str | None:
        return self.plan.skip_reason(t)

    def reference_for(self, t: Topology) -> Topology | None:
        return self.plan.reference_for(t)
