"""One place that turns a topology into a backend's deployment.

The test session and ``pdperf serve`` both stand topologies up. Should each choose the backend
class and its arguments on its own, a topology served by hand to look at (``pdperf serve``)
could differ from the one the tests measure (another model under --model, other Ray server
classes, another model cache) without anyone noticing; through ``make_deployment`` both get the
same deployment from the same options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pdperf.backends.base import Deployment
from pdperf.backends.ray_serve import RayCluster, RayServeDeployment
from pdperf.backends.vllm_proc import ExternalDeployment, GpuLedger, VllmProcessDeployment
from pdperf.errors import ClusterError, SpecError
from pdperf.models import DEFAULT_CACHE
from pdperf.specs import Topology


@dataclass(frozen=True)
class BackendOptions:
    """What stands topologies up (``name``) and the settings every deployment of it takes."""

    name: Literal["ray", "vllm", "external"]
    model_override: str | None = None  # --model: GPU topologies serve it instead of their file's model
    stream_batching_ms: int = 0  # ray: Serve LLM's stream batching interval (0 = off)
    keep_deployments: bool = False  # ray: leave Serve apps running at the end, adopt running ones
    wrap_ray_servers: bool = True  # ray: replicas pick their own torch.distributed port (ray_replica.py)
    model_cache: Path = DEFAULT_CACHE  # where model folders (tiny-llama, GPU shapes) are built
    external_url: str | None = None  # external: the server's base URL
    external_model: str | None = None  # external: the model id it serves (default: the first it lists)
    tokenizer: str | None = None  # external: the tokenizer prompts are built with (key or folder)

    def model_for(self, t: Topology) -> str:
        """The model ``t``'s engines serve: --model swaps GPU topologies' model only (the CPU stack
        runs tiny-llama, which no other model fits on two cores)."""
        return self.model_override if (self.model_override and t.device == "gpu") else t.model


def make_deployment(backend: BackendOptions, topology: Topology, *, log_dir: Path,
                    cluster: RayCluster | None = None, ledger: GpuLedger | None = None) -> Deployment:
    """A deployment of ``topology`` by ``backend``, not yet launched. The ray backend needs the session's
    connected ``cluster``; the vllm backend its ``ledger`` (one per process: two deployments up at once
    must not be handed the same GPU) and ``log_dir`` for the engines' logs."""
    if backend.name == "ray":
        if cluster is None:
            raise ClusterError(f"topology {topology.name}: internal: the Ray cluster is not connected")
        return RayServeDeployment(topology, cluster, model=backend.model_for(topology),
                                  stream_batching_interval_ms=backend.stream_batching_ms,
                                  keep=backend.keep_deployments, wrap_servers=backend.wrap_ray_servers,
                                  model_cache=backend.model_cache)
    if backend.name == "vllm":
        if ledger is None:
            raise ClusterError(f"topology {topology.name}: internal: the vllm backend needs the session's GPU ledger")
        return VllmProcessDeployment(topology, log_dir, ledger=ledger, model=backend.model_for(topology),
                                     model_cache=backend.model_cache)
    if backend.name == "external":
        if not backend.external_url:
            raise SpecError("--backend external needs --external-url URL (the server's base URL)")
        return ExternalDeployment(topology, backend.external_url, tokenizer=backend.tokenizer,
                                  model_id=backend.external_model, model_cache=backend.model_cache)
    raise SpecError(f"--backend {backend.name}: expected one of ray, vllm, external")


def start_cluster(ray_address: str | None, *, metrics_report_interval_ms: int) -> RayCluster:
    """Connect to the Ray cluster at ``ray_address``, or start a local head on loopback (None), with
    Serve running; ClusterError names --ray-address when nothing answers there."""
    return RayCluster(ray_address, metrics_report_interval_ms=metrics_report_interval_ms).start()
