"""Synthetic results with known timings: for the harness's own tests and a demo report.

Building RequestRecords from chosen TTFT and per-token gaps lets a test know the answer
(a point built with ``tpot_ms=10, sigma=0`` has a TPOT of exactly 10 ms), and lets the
report be looked at without a cluster: ``python -m pdperf.report --demo OUT_DIR``.
Nothing here is used on a real run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdperf import metrics
from pdperf.results import Environment, PointResult, RequestRecord, Telemetry, atomic_write_json, save_point
from pdperf.specs import SLO

DEMO_ENVIRONMENT: dict[str, Any] = {  # in the shape pdperf.environment.fingerprint writes
    "hardware_id": "h100-80gb-x4",
    "cluster": "demo (synthetic numbers)",
    "nodes": 1,
    "gpu_model": "NVIDIA H100 80GB HBM3",
    "gpus_per_node": [4],
    "gpu_driver": "570.124.06",
    "efa": {"10.0.0.1": 0},
    "ray": "2.60.0",
    "vllm": "0.32.0",
    "nixl": "1.3.2",
    "ucx": "1.20.0",
    "settings": {"UCX_TLS": "cuda_ipc,cuda_copy,tcp", "UCX_NET_DEVICES": "all"},
    "git_sha": "0123456789abcdef0123456789abcdef01234567",
}


def synthetic_records(n: int, *, ttft_ms: float, tpot_ms: float, output_tokens: int = 16, input_tokens: int = 128,
                      sigma: float = 0.25, seed: int = 0, errors: int = 0, warmup: int = 0,
                      spacing_s: float = 0.01) -> list[RequestRecord]:
    """``n`` successful requests (plus ``errors`` failed and ``warmup`` warm-up ones), one every ``spacing_s``.

    TTFT and each per-token gap are log-normal around ``ttft_ms`` / ``tpot_ms`` with shape
    ``sigma``; ``sigma=0`` gives exactly those values. One token per stream chunk.
    """
    rng = np.random.default_rng(seed)
    records: list[RequestRecord] = []

    def draw(median_ms: float, size: int | None = None) -> Any:
        if sigma == 0:
            return np.full(size, median_ms) if size is not None else median_ms
        return median_ms * rng.lognormal(0.0, sigma, size)

    for i in range(warmup + n):
        scheduled = i * spacing_s
        first = scheduled + float(draw(ttft_ms)) / 1000.0
        gaps = np.asarray(draw(tpot_ms, output_tokens - 1), dtype=float) / 1000.0
        chunks = [first] + list(first + np.cumsum(gaps))
        records.append(RequestRecord(index=i, scheduled_s=scheduled, sent_s=scheduled, first_token_s=first,
                                     end_s=float(chunks[-1]), chunk_times_s=[float(t) for t in chunks],
                                     chunk_tokens=[1] * len(chunks), input_tokens=input_tokens,
                                     output_tokens=output_tokens, warmup=i < warmup))
    for j in range(errors):
        idx = warmup + n + j
        records.append(RequestRecord(index=idx, scheduled_s=idx * spacing_s, sent_s=idx * spacing_s,
                                     input_tokens=input_tokens, error="http_5xx", error_detail="503 synthetic"))
    return records


def synthetic_point(topology: str, workload: str = "isl128-osl16", point_value: float = 4, *,
                    sweep_kind: str = "concurrency", gpus: int = 2, n: int = 200, ttft_ms: float = 50.0,
                    tpot_ms: float = 10.0, output_tokens: int = 16, sigma: float = 0.25, seed: int = 0,
                    errors: int = 0, hardware_id: str = "cpu-2c-test", environment: dict[str, Any] | None = None,
                    telemetry: dict[str, Any] | None = None, flags: Sequence[str] = (),
                    slos: Sequence[SLO] = (), spacing_s: float = 0.01) -> PointResult:
    """A PointResult with a computed summary, as the load runner would save it."""
    records = synthetic_records(n, ttft_ms=ttft_ms, tpot_ms=tpot_ms, output_tokens=output_tokens, sigma=sigma,
                                seed=seed, errors=errors, spacing_s=spacing_s)
    duration_s = max(r.end_s or r.scheduled_s for r in records) - min(r.scheduled_s for r in records)
    point_id = f"c{int(point_value)}" if sweep_kind == "concurrency" else f"r{point_value:g}"
    env = Environment.model_validate({"hardware_id": hardware_id, **(environment or {})})
    return PointResult(topology=topology, workload=workload, point_id=point_id, sweep_kind=sweep_kind,
                       point_value=float(point_value), gpus=gpus, started_at="2026-11-27T12:00:00+00:00",
                       duration_s=duration_s, records=records,
                       summary=metrics.summarize(records, duration_s=duration_s, gpus=gpus, slos=slos),
                       telemetry=Telemetry.model_validate(telemetry or {}), environment=env, flags=list(flags))


def demo_points(*, n: int = 200, seed: int = 0) -> list[PointResult]:
    """A small sweep of three topologies with the shapes the reference study saw.

    Collocated and PD at 2 GPUs, plus collocated TP2 at 2 GPUs: PD has flatter TPOT
    and worse TTFT at low load; one point carries a replica restart flag.
    """
    shapes = {
        # name: (gpus, ttft(c), tpot(c), telemetry kind)
        "collocated-2x-tp1": (2, lambda c: 40 + 9 * c, lambda c: 6.0 + 0.35 * c, "collocated"),
        "collocated-1x-tp2": (2, lambda c: 35 + 11 * c, lambda c: 5.0 + 0.45 * c, "collocated"),
        "pd-1p1d": (2, lambda c: 70 + 6 * c, lambda c: 6.2 + 0.08 * c, "pd"),
    }
    points = []
    for k, (name, (gpus, ttft, tpot, kind)) in enumerate(shapes.items()):
        for c in (1, 4, 16, 64):
            t, d = ttft(c), tpot(c)
            telemetry = {"queue_time_s": t * 0.3 / 1000, "prefill_time_s": t * 0.5 / 1000,
                         "decode_time_s": d * 15 / 1000}
            if kind == "pd":
                telemetry["kv_transfer_time_s"] = t * 0.2 / 1000
            flags = ["replica_restart_during_load"] if (name == "collocated-1x-tp2" and c == 64) else []
            env = dict(DEMO_ENVIRONMENT, topology_kind=kind)
            e2e_s = (t + d * 15) / 1000.0
            points.append(synthetic_point(name, "isl1024-osl16", c, gpus=gpus, n=n, ttft_ms=t, tpot_ms=d,
                                          seed=seed + 100 * k + c, environment=env, telemetry=telemetry,
                                          flags=flags, errors=3 if flags else 0, spacing_s=e2e_s / c))
    return points


def write_demo_run(run_dir: Path, *, n: int = 200, seed: int = 0, with_verdicts: bool = True) -> Path:
    """Write a complete synthetic run folder (run.json, points/, verdicts.json); returns ``run_dir``."""
    from pdperf.gate.point import VerdictRecord
    from pdperf.gate.verdicts import GateResult, MetricVerdict

    run_dir = Path(run_dir)
    points = demo_points(n=n, seed=seed)
    atomic_write_json(run_dir / "run.json", {
        "run_id": run_dir.name, "started_at": "2026-11-27T12:00:00+00:00",
        "finished_at": "2026-11-27T12:40:00+00:00", "environment": DEMO_ENVIRONMENT,
        "command": "pytest -m sweep --topology pd-1p1d,collocated-2x-tp1,collocated-1x-tp2",
        "git_sha": DEMO_ENVIRONMENT["git_sha"]})
    for p in points:
        save_point(run_dir / "points" / f"{p.topology}__{p.workload}__{p.point_id}.json", p)
    if with_verdicts:
        regressed = GateResult(
            point="pd-1p1d/isl1024-osl16/c64", status="regressed", hardware_id="h100-80gb-x4",
            baseline_hardware_id="h100-80gb-x4", thresholds_source="default",
            verdicts=[MetricVerdict("tpot_ms", "p99", "lower-is-better", "regressed", "exceeds +25%", 14.1, 29.8,
                                    2.11, (1.9, 2.3), 1e-12, 0.25, 200, 200, "ms")])
        verdicts = [
            VerdictRecord(test_id=f"tests/sweeps/test_sweep.py::test_point[{p.id}]",
                          outcome="failed" if p.id == regressed.point else "passed",
                          reason=regressed.message() if p.id == regressed.point else "", points=[p.id],
                          slo=list(p.summary.slos), gate=regressed if p.id == regressed.point else None)
            for p in points]
        verdicts.append(VerdictRecord(test_id="tests/sweeps/test_sweep.py::test_point[pd-2p2d-spread/isl1024-osl16/c16]",
                                      outcome="skipped", reason="topology pd-2p2d-spread needs 2 GPU nodes, found 1"))
        atomic_write_json(run_dir / "verdicts.json", [v.to_dict() for v in verdicts])
    return run_dir
