"""Faults on the real stack: an engine dies in the middle of a load point.

What a user must see when that happens on the cluster: the point is errored (its failed requests
counted by cause, no performance verdict, never a pass), the replica's restart is recorded, the
deployment serves again once Ray Serve has replaced the replica, and the next point of the sweep
measures normally. Here on the embedded CPU stack: the engine process of cpu-colloc-1xtp1 is
killed with SIGKILL once the server reports requests running.
"""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

from pdperf.gate.point import judge
from pdperf.loadgen.runner import single_request
from pdperf.loadgen.telemetry import parse_prometheus, scrape
from pdperf.waiting import poll_until

pytestmark = pytest.mark.faults


def engine_cores(app: str) -> list[psutil.Process]:
    """The vLLM engine-core processes under this Serve application's replicas, on this machine."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info.get("cmdline") or [])
            if cmd.startswith("ray::ServeReplica:" + app + ":") and "Ingress" not in cmd:
                out += [c for c in p.children(recursive=True) if c.name().startswith("VLLM::EngineCore")
                        or " ".join(c.cmdline()).startswith("VLLM::EngineCore")]
        except psutil.Error:
            continue
    return out


def requests_running(metrics_urls: list[str]) -> float:
    texts, _ = scrape(metrics_urls, timeout_s=2)
    return sum(v for text in texts.values() for (name, _), v in parse_prometheus(text).items()
               if name == "vllm_num_requests_running")


@pytest.fixture
def long_point(pdperf_ctx):
    """The CPU smoke workload at c2 with enough requests to be killed in the middle of."""
    wl = pdperf_ctx.all_workloads["smoke-cpu"]
    return wl.model_copy(update={"sweep": wl.sweep.model_copy(update={"requests_per_point": 40})})


@pytest.mark.topology_kind("collocated")
@pytest.mark.topology_tag("cpu")
def test_engine_killed_mid_point(topology, endpoint, long_point, measure, baselines_root, thresholds, pdperf_ctx,
                                 record_property):
    app = endpoint.details.get("app")
    if endpoint.backend != "ray" or not app:
        pytest.skip("kills a Ray Serve replica's engine: --backend ray only")
    engines = engine_cores(app)
    if not engines:
        pytest.skip(f"no engine process of Serve app {app} on this machine (its replica runs on another node)")
    killed: list[int] = []

    def kill_when_busy() -> None:
        try:
            poll_until(lambda: True if requests_running(endpoint.metrics_urls) > 0 else None,
                       what="requests running on the engine", timeout_s=120, interval_s=0.2, max_interval_s=0.5)
        except TimeoutError:
            return
        for p in engines:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    restarts_before = endpoint.restarts()
    result = measure(endpoint, long_point, long_point.sweep.points[0])
    killer.join(timeout=130)
    assert killed, "the engine was never seen busy, so it was not killed: the test proves nothing"
    v = judge(result, test_id="fault", baselines_root=baselines_root, thresholds=thresholds, gate=False)
    s = result.summary
    record_property("failed_of_sent", f"{s.requests_failed}/{s.requests}")
    record_property("error_kinds", ",".join(sorted(s.errors)))
    assert v.errored, f"{result.id}: the engine died mid-point, yet the point is not errored: {s.errors}"
    assert f"of {s.requests} requests failed" in v.failure_message(), v.failure_message()
    assert v.gate is None and v.gate_status is None  # no performance verdict from survivors

    # The deployment comes back (Ray Serve replaces the replica) and the sweep's next point measures.
    def serves() -> bool | None:
        try:
            return True if single_request(endpoint.base_url, endpoint.model_id, "hello", 4, timeout_s=30)[0].ok else None
        except OSError:  # the ingress itself may refuse while the replica is replaced
            return None

    poll_until(serves, what=f"{app} serving again after its engine was killed",
               timeout_s=pdperf_ctx.options.deploy_timeout_s, interval_s=2, max_interval_s=10)
    assert endpoint.restarts() > restarts_before, "the replica's restart is not recorded"
    again = measure(endpoint, long_point, 1)  # another point id: the errored one stays in the run and its report
    assert again.summary.requests_failed == 0, again.summary.errors
