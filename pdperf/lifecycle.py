"""Deployments for a test session: each topology stood up once, shared, torn down at the end.

The session's runtime (``pdperf.session.runtime.SessionRuntime``) owns the pool and gives it its
one way to make a deployment (the backend factory). ``get(topology)`` deploys on first use and
returns the same Endpoint afterwards; when ``max_alive`` deployments are up, or the next one's
GPUs would not fit beside those up (``gpu_capacity``), the least recently used one is torn down
first, even one ``--keep-deployments`` would leave running (a 2-core CI machine cannot hold many
engines; a 4-GPU machine cannot hold a 2-GPU PD topology, its 1-GPU reference and a 2-GPU one). A
deployment that failed is remembered with its error, so every test that needs it fails
fast with the same message instead of retrying a multi-minute start-up.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pdperf.backends.base import Deployment, Endpoint
from pdperf.errors import PdperfError
from pdperf.specs import Topology

log = logging.getLogger(__name__)


@dataclass
class StartupRecord:
    topology: str
    backend: str
    startup_s: float | None
    restarts_at_ready: int = 0
    error: str | None = None
    teardown_s: float | None = None
    details: dict = field(default_factory=dict)


class DeploymentPool:
    def __init__(self, factory: Callable[[Topology], Deployment], *, max_alive: int = 2,
                 timeout_s: float = 900.0, gpu_capacity: int | None = None):
        self.factory = factory
        self.max_alive = max(1, max_alive)
        self.gpu_capacity = gpu_capacity or None  # GPUs of the cluster; None: count deployments only
        self.timeout_s = timeout_s
        self._alive: OrderedDict[str, tuple[Deployment, Endpoint]] = OrderedDict()
        self._failed: dict[str, PdperfError] = {}
        self.startups: list[StartupRecord] = []
        self.teardown_errors: list[str] = []

    def get(self, topology: Topology) -> Endpoint:
        name = topology.name
        if name in self._failed:
            raise self._failed[name]
        if name in self._alive:
            self._alive.move_to_end(name)
            return self._alive[name][1]
        while self._alive and (len(self._alive) >= self.max_alive or not self._fits(topology)):
            self._stop(next(iter(self._alive)), evict=True)
        deployment = self.factory(topology)
        self._launch(topology, deployment)
        return self._finish(topology, deployment)

    def prestart(self, topologies: list[Topology]) -> None:
        """Launch several deployments side by side, then wait for each: start-up costs overlap.

        Errors are remembered per topology and raised by ``get`` for the tests that need it.
        """
        todo = [t for t in topologies if t.name not in self._alive and t.name not in self._failed]
        todo = todo[: max(0, self.max_alive - len(self._alive))]
        launched = []
        try:
            for t in todo:
                d = self.factory(t)
                try:
                    self._launch(t, d)
                except PdperfError:
                    continue
                launched.append((t, d))
            while launched:
                t, d = launched[0]
                try:
                    self._finish(t, d)
                except PdperfError:
                    pass
                launched.pop(0)
        finally:
            for _, d in launched:  # interrupted (Ctrl-C, timeout): leave nothing running
                self._safe_stop(d)

    def _launch(self, topology: Topology, deployment: Deployment) -> None:
        try:
            deployment.launch()
        except PdperfError as e:
            self._fail(topology, deployment, e)
            raise
        except BaseException:
            self._safe_stop(deployment)
            raise

    def _finish(self, topology: Topology, deployment: Deployment) -> Endpoint:
        try:
            endpoint = deployment.wait_ready(self.timeout_s)
        except PdperfError as e:
            self._fail(topology, deployment, e)
            raise
        except BaseException:
            self._safe_stop(deployment)
            raise
        self._alive[topology.name] = (deployment, endpoint)
        self.startups.append(StartupRecord(topology.name, deployment.backend, endpoint.startup_s,
                                           endpoint.restarts_at_ready, details=dict(endpoint.details)))
        return endpoint

    def _fail(self, topology: Topology, deployment: Deployment, e: PdperfError) -> None:
        self._failed[topology.name] = e
        self.startups.append(StartupRecord(topology.name, deployment.backend, None, error=str(e).splitlines()[0]))
        self._safe_stop(deployment)

    def alive(self) -> list[str]:
        return list(self._alive)

    def _safe_stop(self, deployment: Deployment) -> None:
        try:
            deployment.stop()
        except Exception as e:  # noqa: BLE001 - report the start-up error, not the cleanup's
            log.warning("cleanup after failed start of %s: %s", getattr(deployment, "topology", "?"), e)

    def holds_together(self, topologies: list[Topology]) -> bool:
        """Whether these can all be up at once (``max_alive`` and GPUs): a test that needs two
        deployments side by side must not have the second evict the first."""
        gpus = sum(t.gpus for t in topologies if t.device == "gpu")
        return len(topologies) <= self.max_alive and (self.gpu_capacity is None or gpus <= self.gpu_capacity)

    def _fits(self, topology: Topology) -> bool:
        if self.gpu_capacity is None or topology.device != "gpu":
            return True
        used = sum(ep.topology.gpus for _, ep in self._alive.values() if ep.topology.device == "gpu")
        return used + topology.gpus <= self.gpu_capacity

    def _stop(self, name: str, *, evict: bool = False) -> None:
        deployment, _ = self._alive.pop(name)
        t0 = time.monotonic()
        try:
            deployment.stop(evict=evict)
        except Exception as e:  # noqa: BLE001 - recorded and reported by close(); the pool goes on
            self.teardown_errors.append(f"teardown of {name}: {type(e).__name__}: {e}")
        for rec in reversed(self.startups):
            if rec.topology == name and rec.teardown_s is None:
                rec.teardown_s = time.monotonic() - t0
                break

    def release_all(self) -> None:
        """Tear every deployment down now and keep the pool usable (a later ``get`` deploys again):
        for a test that needs the machine to itself (on 2 cores an idle PD engine's NIXL progress
        thread spins a core)."""
        for name in list(self._alive):
            self._stop(name, evict=True)

    def close(self) -> list[str]:
        """Tear every deployment down; return the errors met (teardown continues past them)."""
        for name in list(self._alive):
            self._stop(name)
        errors, self.teardown_errors = self.teardown_errors, []
        return errors
