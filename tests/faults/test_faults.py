"""Faults on the real stack: an engine dies in the middle of a load point; a server stalls streams
and answers 503 / 429.

What a user must see when that happens on the cluster: the point is errored (its failed requests
counted by cause, no performance verdict, never a pass), a replica's restart is recorded on the
point it failed, the deployment serves again once Ray Serve has replaced the replica, and the next
point of the sweep measures normally. Here on the embedded CPU stack:

- an engine process is SIGKILLed once the point's measured requests have started finishing:
  cpu-colloc-1xtp1's one engine, and on cpu-pd-1p1-1d1 the prefill's engine and then the decode's
  (each role's replica is its own Serve deployment, ``Prefill:<model>`` / ``Decode:<model>``; the
  decode replica orchestrates every request, the prefill one answers the decode's calls);
- pdperf.inject's proxy in front of cpu-colloc-1xtp1 stalls streams after a few events and answers
  503 and 429 (a FaultPlan), then passes everything through for the next point.

docs/RELIABILITY.md ("Faults on the real stack") has what was measured.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable

import psutil
import pytest

from pdperf.backends.base import Endpoint
from pdperf.gate.point import RESTART_FLAG, RESTART_SETTLE_KEY, judge
from pdperf.gate.store import INJECTED_FLAG, BaselineError, write_baseline
from pdperf.inject import FaultPlan, SlowdownProxyProcess
from pdperf.loadgen.runner import single_request
from pdperf.loadgen.telemetry import parse_prometheus, scrape
from pdperf.results import PointResult
from pdperf.specs import Workload
from pdperf.waiting import poll_until

pytestmark = pytest.mark.faults

# Which Serve deployment's replicas hold a role's engine: Ray Serve LLM names PD deployments
# "Prefill:<model>" and "Decode:<model>" (build_pd_openai_app's name_prefix); a collocated
# app's engine is under its one LLM deployment, the only one that is not the ingress.
ROLE_DEPLOYMENT = {"prefill": "Prefill:", "decode": "Decode:"}


def engine_cores(app: str, role: str | None = None) -> list[psutil.Process]:
    """The vLLM engine-core processes under this Serve application's replicas (of one PD role), on this machine."""
    out = []
    prefix = "ray::ServeReplica:" + app + ":"
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info.get("cmdline") or [])
            if not cmd.startswith(prefix) or "Ingress" in cmd:
                continue
            if role is not None and not cmd[len(prefix):].startswith(ROLE_DEPLOYMENT[role]):
                continue
            out += [c for c in p.children(recursive=True) if c.name().startswith("VLLM::EngineCore")
                    or " ".join(c.cmdline()).startswith("VLLM::EngineCore")]
        except psutil.Error:
            continue
    return out


def engine_counts(metrics_urls: list[str]) -> tuple[float, float]:
    """(requests running, requests finished) summed over the engines' /metrics."""
    texts, _ = scrape(metrics_urls, timeout_s=2)
    samples = [(name, v) for text in texts.values() for (name, _), v in parse_prometheus(text).items()]
    return (sum(v for name, v in samples if name == "vllm_num_requests_running"),
            sum(v for name, v in samples if name == "vllm_request_success_total"))


def kill_workload(pdperf_ctx, requests: int, *, osl: int) -> Workload:
    """The CPU smoke workload's prompts under a name of its own, no warm-up (the engines are warm: this
    measures failures, not speed), with outputs long enough that the measured phase is still running
    when the kill lands (the engines' counters reach the killer through Ray's metrics, ~1 s late:
    smoke-cpu's 32 tokens made the whole point end first on a quiet machine, 12 requests in 1.9 s). A
    request the dead engine leaves hanging ends as a `timeout` the verdict names: a stream stalled
    mid-way at the stalled-stream timeout of 20 s (SIGKILL of the PD prefill engine stalled a decode
    stream after 226 of 256 tokens: without it, it ran into the 60 s request timeout; a healthy gap
    here is well under a second), one with no token at 60 s."""
    wl = pdperf_ctx.all_workloads["smoke-cpu"]
    sweep = wl.sweep.model_copy(update={"requests_per_point": requests, "warmup_requests": 0})
    return wl.model_copy(update={"name": "fault-kill", "osl": osl, "request_timeout_s": 60.0,
                                 "stream_idle_timeout_s": 20.0, "sweep": sweep})


def next_workload(pdperf_ctx) -> Workload:
    """The sweep's next point after a kill: a few short requests show the replaced replica serves."""
    wl = pdperf_ctx.all_workloads["smoke-cpu"]
    return wl.model_copy(update={"name": "fault-kill-next", "sweep": wl.sweep.model_copy(
        update={"requests_per_point": 4, "warmup_requests": 0})})


def kill_mid_point(endpoint: Endpoint, engines: list[psutil.Process], measure: Callable[..., PointResult],
                   workload: Workload, point: float, *, after_measured: int = 2) -> tuple[PointResult, list[int]]:
    """Measure one point, SIGKILLing ``engines`` in its measured phase: once the engines have finished the
    warm-up and ``after_measured`` measured requests (so the point usually has survivors, the case where a
    partial number could pass for a result) and report requests running. A PD request counts on both
    engines, its prefill's long before its decode's: there the kill can come before any measured request
    has ended (seen: the decode kill's point had none)."""
    killed: list[int] = []
    per_request = 2 if endpoint.topology.kind == "pd" else 1
    _, done_before = engine_counts(endpoint.metrics_urls)
    finished = (workload.sweep.warmup_requests + after_measured) * per_request

    point_over = threading.Event()

    def busy_after_some() -> str | None:
        if point_over.is_set():
            return "over"
        running, done = engine_counts(endpoint.metrics_urls)
        return "kill" if running > 0 and done - done_before >= finished else None

    def kill_when_busy() -> None:
        try:
            when = poll_until(busy_after_some, what=f"{after_measured} measured requests finished and more running",
                              timeout_s=600, interval_s=0.2, max_interval_s=0.5)
        except TimeoutError:
            return
        if when == "over":  # the point ended before the moment came: nothing killed, the test says so
            return
        for p in engines:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        result = measure(endpoint, workload, point)
    finally:
        point_over.set()
    killer.join(timeout=30)
    return result, killed


def assert_errored_and_recovers(result: PointResult, endpoint: Endpoint, restarts_before: int, *, measure,
                                workload: Workload, next_point: float, baselines_root, thresholds, pdperf_ctx,
                                record_property) -> None:
    """The point is errored with its causes, the restart is recorded on it, the deployment serves again
    and the sweep's next point measures with no failure."""
    v = judge(result, test_id="fault", baselines_root=baselines_root, thresholds=thresholds, gate=False)
    s = result.summary
    record_property("failed_of_sent", f"{s.requests_failed}/{s.requests}")
    record_property("error_kinds", ",".join(f"{k}:{n}" for k, n in sorted(s.errors.items())))
    record_property("flags", ",".join(result.flags))
    record_property("duration_s", f"{result.duration_s:.1f}")
    assert v.errored, f"{result.id}: the engine died mid-point, yet the point is not errored: {s.errors}"
    message = v.failure_message() or ""
    assert f"of {s.requests} requests failed" in message, message
    assert all(kind in message for kind in s.errors), message  # every cause named
    assert v.gate is None and v.gate_status is None  # no performance verdict from survivors

    # The deployment comes back (Ray Serve replaces the replica) and the sweep's next point measures.
    app = endpoint.details.get("app")

    def serves() -> bool | None:
        try:
            return True if single_request(endpoint.base_url, endpoint.model_id, "hello", 4, timeout_s=30)[0].ok else None
        except OSError:  # the ingress itself may refuse while the replica is replaced
            return None

    poll_until(serves, what=f"{app} serving again after its engine was killed",
               timeout_s=pdperf_ctx.options.deploy_timeout_s, interval_s=2, max_interval_s=10)
    restarts = endpoint.restarts() - restarts_before
    record_property("restarts", str(restarts))
    assert restarts > 0, "the replica's restart is not recorded"
    # the point that the dead engine failed carries the restart, though Serve replaced the replica only
    # after the point ended (pdperf.gate.point.restarts_during_point)
    assert any(f.startswith(RESTART_FLAG + ":") for f in result.flags), result.flags
    assert "a serving replica restarted during the point" in message, message
    # another point id: the errored one stays in the run; a few requests show the replaced replica serves
    again = measure(endpoint, next_workload(pdperf_ctx), next_point)
    record_property("next_point_failed_of_sent", f"{again.summary.requests_failed}/{again.summary.requests}")
    assert again.summary.requests_failed == 0, again.summary.errors
    assert not any(f.startswith(RESTART_FLAG) for f in again.flags), again.flags


@pytest.mark.topology_kind("collocated")
@pytest.mark.topology_tag("cpu")
@pytest.mark.last_in_topology  # the topology's other tests measure the engines it started with, not replacements
def test_engine_killed_mid_point(topology, endpoint, measure, baselines_root, thresholds, pdperf_ctx,
                                 record_property):
    app = endpoint.details.get("app")
    if endpoint.backend != "ray" or not app:
        pytest.skip("kills a Ray Serve replica's engine: --backend ray only")
    engines = engine_cores(app)
    if not engines:
        pytest.skip(f"no engine process of Serve app {app} on this machine (its replica runs on another node)")
    wl = kill_workload(pdperf_ctx, 16, osl=256)
    restarts_before = endpoint.restarts()
    result, killed = kill_mid_point(endpoint, engines, measure, wl, 2)
    assert killed, "the engine was never seen busy, so it was not killed: the test proves nothing"
    assert_errored_and_recovers(result, endpoint, restarts_before, measure=measure, workload=wl, next_point=4,
                                baselines_root=baselines_root, thresholds=thresholds, pdperf_ctx=pdperf_ctx,
                                record_property=record_property)


@pytest.mark.topology_kind("pd")
@pytest.mark.topology_tag("cpu")
@pytest.mark.last_in_topology  # after the network tier's KV-path tests of this topology, which read the engines' start-up
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_pd_engine_killed_mid_point(role, topology, request, measure, baselines_root, thresholds, pdperf_ctx,
                                    record_property):
    if "smoke" not in topology.tags:  # checked before the endpoint fixture deploys it (minutes on 2 cores)
        pytest.skip("PD engines are killed on the smoke PD topology only (a PD start-up costs ~2 min on 2 cores); "
                    "this connector's variant is not killed")
    endpoint: Endpoint = request.getfixturevalue("endpoint")
    app = endpoint.details.get("app")
    if endpoint.backend != "ray" or not app:
        pytest.skip("kills a Ray Serve replica's engine: --backend ray only")
    engines = engine_cores(app, role)
    if not engines:
        pytest.skip(f"no {role} engine process of Serve app {app} on this machine (its replica runs on another node)")
    wl = kill_workload(pdperf_ctx, 16, osl=128)  # PD decodes ~5x slower here than collocated: half the tokens
    # each role's two points have ids of their own, so both roles' points stay in the run folder and its report
    point, next_point = (2, 4) if role == "prefill" else (3, 5)
    restarts_before = endpoint.restarts()
    result, killed = kill_mid_point(endpoint, engines, measure, wl, point)
    assert killed, f"the {role} engine was never seen busy, so it was not killed: the test proves nothing"
    assert_errored_and_recovers(result, endpoint, restarts_before, measure=measure, workload=wl,
                                next_point=next_point, baselines_root=baselines_root,
                                thresholds=thresholds, pdperf_ctx=pdperf_ctx, record_property=record_property)


def fault_workload(pdperf_ctx, requests: int) -> Workload:
    """The CPU smoke workload, no warm-up (the proxy counts the plan's first K requests from the point's
    first), a stalled-stream timeout of 10 s (a healthy gap on this stack is well under a second at c2 on
    2 cores; 10 s leaves room for a busy machine) and a request timeout of 60 s the stalls end well inside."""
    wl = pdperf_ctx.all_workloads["smoke-cpu"]
    sweep = wl.sweep.model_copy(update={"requests_per_point": requests, "warmup_requests": 0})
    return wl.model_copy(update={"name": "fault-proxy", "sweep": sweep, "request_timeout_s": 60.0,
                                 "stream_idle_timeout_s": 10.0})


@pytest.mark.topology_kind("collocated")
@pytest.mark.topology_tag("cpu")
def test_stalled_streams_and_refusals_through_a_fault_proxy(topology, endpoint, measure, baselines_root, thresholds,
                                                            pdperf_ctx, record_property, tmp_path):
    """The real server behind pdperf.inject's proxy with a FaultPlan: streams that stop after a few events
    and hold the connection open, 503 for the first requests, then a window of 429 answers; then the
    plan is cleared and the next point measures cleanly. Every point measured through the proxy is
    flagged injected, so none of them can become a baseline."""
    wl = fault_workload(pdperf_ctx, 12)
    proxy = SlowdownProxyProcess(endpoint.base_url, 0.0, faults=FaultPlan(status=503, status_first=3,
                                                                          stall_after_events=4, stall_every=3))
    with proxy as url:
        # flagged injected (never a baseline); its failures are the proxy's answers, no replica dies: no settle wait
        through = dataclasses.replace(endpoint, base_url=url, details={**endpoint.details, INJECTED_FLAG: 0.0,
                                                                       RESTART_SETTLE_KEY: 0.0})
        stalls = measure(through, wl, 2)
        stall_counts = proxy.fault_counts()
        proxy.set_faults(FaultPlan(status=429, status_for_s=3.0))
        refused = measure(through, wl, 1)
        refused_counts = proxy.fault_counts()
        proxy.set_faults(FaultPlan())
        clean = measure(through, wl, 3)

    def verdict(result: PointResult) -> str:
        v = judge(result, test_id="fault", baselines_root=baselines_root, thresholds=thresholds, gate=False)
        assert v.errored and v.gate is None, f"{result.id}: faults injected, yet not errored: {result.summary.errors}"
        return v.failure_message() or ""

    # 503 for the first 3 requests; of the other 9 (arrivals 3..11), every third stalls after 4 events
    s = stalls.summary
    record_property("stalls_failed_of_sent", f"{s.requests_failed}/{s.requests}")
    record_property("stalls_errors", ",".join(f"{k}:{n}" for k, n in sorted(s.errors.items())))
    assert stall_counts.answered_status == 3 and stall_counts.stalled == 3, stall_counts
    assert s.errors == {"http_5xx": 3, "timeout": 3}, s.errors
    first_line = verdict(stalls).splitlines()[0]
    assert first_line.startswith("errored, no performance verdict: 6 of 12 requests failed (error budget 0): "), first_line
    assert "http_5xx (HTTP 503: " in first_line and "timeout (stream stalled: no token for 10 s after " in first_line
    stalled = [r for r in stalls.records if r.error == "timeout"]
    assert all(r.output_tokens > 0 and (r.error_detail or "").startswith("stream stalled") for r in stalled)
    assert stalls.duration_s < wl.request_timeout_s, "the stalls were not ended by the stalled-stream timeout"

    s = refused.summary
    record_property("refused_failed_of_sent", f"{s.requests_failed}/{s.requests}")
    assert s.errors == {"http_4xx": refused_counts.answered_status} and refused_counts.answered_status >= 1, (
        s.errors, refused_counts)
    first_line = verdict(refused).splitlines()[0]
    assert f"{s.requests_failed} of {s.requests} requests failed" in first_line and "http_4xx (HTTP 429: " in first_line

    assert clean.summary.requests_failed == 0, clean.summary.errors
    record_property("clean_ok_of_sent", f"{clean.summary.requests_ok}/{clean.summary.requests}")
    for r in (stalls, refused, clean):  # measured through the proxy: flagged, so never a baseline
        assert f"{INJECTED_FLAG}:0" in r.flags, r.flags
    with pytest.raises(BaselineError, match="never written as a baseline"):
        write_baseline(tmp_path, [clean], allow_flagged=True)
