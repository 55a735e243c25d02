"""DeploymentPool with fake deployments: deploy once, evict the least recently used, remember failures.

The fakes record every call in one shared log, so the tests assert the order of launches,
waits and stops, which is what a multi-minute start-up on a real cluster makes expensive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdperf.backends.base import Deployment, Endpoint
from pdperf.errors import DeployError
from pdperf.lifecycle import DeploymentPool
from pdperf.specs import Topology

pytestmark = pytest.mark.selftest


def topology(name: str) -> Topology:
    return Topology(name=name, kind="collocated", device="cpu", model="tiny-llama", collocated={"tp": 1})


A, B, C = topology("topo-a"), topology("topo-b"), topology("topo-c")


class FakeDeployment(Deployment):
    """Stands in for a backend: records calls; fails where told to."""

    backend = "fake"

    def __init__(self, topo: Topology, calls: list[tuple[str, str]], *, fail_ready: BaseException | None = None,
                 fail_stop: BaseException | None = None):
        self.topology = topo
        self.calls = calls
        self.fail_ready = fail_ready
        self.fail_stop = fail_stop
        self.timeout_s: float | None = None

    def launch(self) -> None:
        self.calls.append(("launch", self.topology.name))

    def wait_ready(self, timeout_s: float) -> Endpoint:
        self.calls.append(("ready", self.topology.name))
        self.timeout_s = timeout_s
        if self.fail_ready is not None:
            raise self.fail_ready
        return Endpoint(topology=self.topology, backend=self.backend, base_url=f"http://fake/{self.topology.name}",
                        model_id=self.topology.name, tokenizer_path=Path("/nonexistent"), startup_s=1.5,
                        details={"fake": True})

    def stop(self, *, evict: bool = False) -> None:
        self.calls.append(("evict" if evict else "stop", self.topology.name))
        if self.fail_stop is not None:
            raise self.fail_stop


class FakeBackend:
    """The pool's factory: one FakeDeployment per call, with per-topology failures."""

    def __init__(self, **failures: dict[str, BaseException]):
        self.calls: list[tuple[str, str]] = []
        self.made: list[FakeDeployment] = []
        self.fail_ready = failures.get("fail_ready", {})
        self.fail_stop = failures.get("fail_stop", {})

    def __call__(self, topo: Topology) -> FakeDeployment:
        d = FakeDeployment(topo, self.calls, fail_ready=self.fail_ready.get(topo.name),
                           fail_stop=self.fail_stop.get(topo.name))
        self.made.append(d)
        return d

    def count(self, what: str, name: str) -> int:
        return self.calls.count((what, name))


def test_deploys_once_and_reuses():
    backend = FakeBackend()
    pool = DeploymentPool(backend, max_alive=2, timeout_s=42.0)
    first = pool.get(A)
    assert pool.get(A) is first
    assert first.base_url == "http://fake/topo-a"
    assert len(backend.made) == 1 and backend.count("launch", "topo-a") == 1
    assert backend.made[0].timeout_s == 42.0
    assert pool.alive() == ["topo-a"]
    [record] = pool.startups
    assert (record.topology, record.backend, record.startup_s, record.error) == ("topo-a", "fake", 1.5, None)


def test_max_alive_evicts_the_least_recently_used():
    backend = FakeBackend()
    pool = DeploymentPool(backend, max_alive=2)
    pool.get(A)
    pool.get(B)
    pool.get(A)  # A is now the most recently used
    pool.get(C)
    assert pool.alive() == ["topo-a", "topo-c"]
    assert backend.calls[-3:] == [("evict", "topo-b"), ("launch", "topo-c"), ("ready", "topo-c")]
    b_record = next(r for r in pool.startups if r.topology == "topo-b")
    assert b_record.teardown_s is not None and b_record.teardown_s >= 0


def gpu_topology(name: str, tp: int, replicas: int = 1, kind: str = "collocated") -> Topology:
    roles = ({"collocated": {"tp": tp, "replicas": replicas}} if kind == "collocated" else
             {"prefill": {"tp": tp, "replicas": replicas}, "decode": {"tp": tp, "replicas": replicas}})
    return Topology(name=name, kind=kind, device="gpu", model="llama-3.1-8b", **roles)


def test_gpu_capacity_evicts_until_the_next_topology_fits():
    """4 GPUs: a 2-GPU collocated topology, then PD 1P1D (2 GPUs) and its 1-GPU greedy reference."""
    backend = FakeBackend()
    pool = DeploymentPool(backend, max_alive=3, gpu_capacity=4)
    colloc, pd, ref = gpu_topology("colloc-2xtp1", 1, 2), gpu_topology("pd-1p1-1d1", 1, kind="pd"), gpu_topology(
        "colloc-1xtp1", 1)
    pool.get(colloc)
    pool.get(pd)
    assert pool.alive() == ["colloc-2xtp1", "pd-1p1-1d1"]  # 4 of 4 GPUs
    pool.get(ref)  # needs 1 more: the least recently used goes, even if --keep-deployments would keep it
    assert pool.alive() == ["pd-1p1-1d1", "colloc-1xtp1"]
    assert ("evict", "colloc-2xtp1") in backend.calls
    pool.close()
    assert backend.calls[-2:] == [("stop", "pd-1p1-1d1"), ("stop", "colloc-1xtp1")]  # the end of the session
    cpu = DeploymentPool(FakeBackend(), max_alive=3, gpu_capacity=0)  # the CPU stack: count only
    for t in (A, B, C):
        cpu.get(t)
    assert cpu.alive() == ["topo-a", "topo-b", "topo-c"]


def test_holds_together_says_when_a_second_deployment_would_evict_the_first():
    """The PD greedy check needs the PD topology and its collocated reference up at once; with
    --max-alive 1 the reference evicted the PD app mid-test (CPU stack: PD answered '' and 404)."""
    pd, ref = gpu_topology("pd-1p1-1d1", 1, kind="pd"), gpu_topology("colloc-1xtp1", 1)
    assert DeploymentPool(FakeBackend(), max_alive=2, gpu_capacity=4).holds_together([pd, ref])
    assert not DeploymentPool(FakeBackend(), max_alive=1, gpu_capacity=4).holds_together([pd, ref])
    assert not DeploymentPool(FakeBackend(), max_alive=2, gpu_capacity=2).holds_together([pd, ref])  # 3 GPUs
    assert DeploymentPool(FakeBackend(), max_alive=2).holds_together([A, B])  # CPU: count only


def test_evicted_topology_is_deployed_again_when_needed():
    backend = FakeBackend()
    pool = DeploymentPool(backend, max_alive=1)
    pool.get(A)
    pool.get(B)
    pool.get(A)
    assert backend.count("launch", "topo-a") == 2
    assert backend.calls.index(("evict", "topo-b")) < backend.calls.index(("launch", "topo-a"), 1)


def test_release_all_stops_everything_and_the_pool_deploys_again():
    backend = FakeBackend()
    pool = DeploymentPool(backend, max_alive=2)
    pool.get(A)
    pool.get(B)
    pool.release_all()
    assert pool.alive() == []
    assert backend.count("evict", "topo-a") == 1 and backend.count("evict", "topo-b") == 1
    pool.get(A)
    assert backend.count("launch", "topo-a") == 2 and pool.alive() == ["topo-a"]


def test_failed_start_is_remembered_without_a_second_start():
    err = DeployError("topology topo-a: Serve reports DEPLOY_FAILED\nreplica log line")
    backend = FakeBackend(fail_ready={"topo-a": err})
    pool = DeploymentPool(backend, max_alive=2)
    with pytest.raises(DeployError) as first:
        pool.get(A)
    with pytest.raises(DeployError) as second:
        pool.get(A)
    assert first.value is err and second.value is err
    assert backend.count("launch", "topo-a") == 1
    assert backend.count("stop", "topo-a") == 1  # what did start is cleaned up
    assert pool.alive() == []
    [record] = pool.startups
    assert record.startup_s is None and record.error == "topology topo-a: Serve reports DEPLOY_FAILED"
    assert pool.get(B).model_id == "topo-b"  # other topologies are unaffected


def test_an_interrupted_start_is_cleaned_up_and_not_remembered():
    backend = FakeBackend(fail_ready={"topo-a": KeyboardInterrupt()})
    pool = DeploymentPool(backend, max_alive=2)
    with pytest.raises(KeyboardInterrupt):
        pool.get(A)
    assert backend.count("stop", "topo-a") == 1
    backend.fail_ready.clear()
    assert pool.get(A).model_id == "topo-a"  # not a user error: the next test may try again


def test_close_continues_past_a_failing_stop():
    backend = FakeBackend(fail_stop={"topo-b": RuntimeError("placement group still pending")})
    pool = DeploymentPool(backend, max_alive=3)
    for t in (A, B, C):
        pool.get(t)
    errors = pool.close()
    assert errors == ["teardown of topo-b: RuntimeError: placement group still pending"]
    assert [c for c in backend.calls if c[0] == "stop"] == [("stop", "topo-a"), ("stop", "topo-b"), ("stop", "topo-c")]
    assert pool.alive() == []
    assert pool.close() == []  # nothing left to stop


def test_prestart_launches_side_by_side_then_waits():
    err = DeployError("topology topo-b: did not become ready")
    backend = FakeBackend(fail_ready={"topo-b": err})
    pool = DeploymentPool(backend, max_alive=3)
    pool.prestart([A, B, C])
    assert backend.calls[:3] == [("launch", "topo-a"), ("launch", "topo-b"), ("launch", "topo-c")]
    assert pool.alive() == ["topo-a", "topo-c"]
    with pytest.raises(DeployError) as e:
        pool.get(B)
    assert e.value is err and backend.count("launch", "topo-b") == 1
    pool.get(A)
    assert backend.count("launch", "topo-a") == 1
