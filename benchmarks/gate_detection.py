"""Does the baseline gate catch a real regression, and does it stay quiet otherwise?

On the embedded CPU stack: deploy a topology twice through Ray Serve LLM — once as the
suite runs it (stream batching off), once with Ray's stream batching switched back on
(``stream_batching_interval_ms: 50``, a real regression users have hit) — run the same
load point several times against each, gate every run against the committed baseline of
this hardware, and print the detection rate (injected runs flagged ``regressed``) and the
false-alarm rate (unchanged runs flagged ``regressed``).

    .venv/bin/python benchmarks/gate_detection.py --runs 5
    .venv/bin/python benchmarks/gate_detection.py --topology cpu-pd-1p1-1d1 --point 1 --runs 4

Numbers go to docs/METHODOLOGY.md. Needs the committed baselines for the topology and
workload on this machine's hardware id (record them with ``pytest -m sweep --update-baselines``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdperf import environment  # noqa: E402
from pdperf.backends.ray_serve import RayCluster, RayServeDeployment  # noqa: E402
from pdperf.cluster import ClusterShape, local_cpu  # noqa: E402
from pdperf.gate import gate_point, load_thresholds  # noqa: E402
from pdperf.loadgen.runner import run_point  # noqa: E402
from pdperf.specs import all_topologies, all_workloads  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="cpu-colloc-1xtp1")
    ap.add_argument("--workload", default="cpu-latency")
    ap.add_argument("--point", type=float, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--injected-ms", type=int, default=50, help="stream batching interval of the injected regression")
    ap.add_argument("--save-points", type=Path, default=None, help="folder to keep each run's PointResult in")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-run verdicts here")
    args = ap.parse_args()

    topo = all_topologies()[args.topology]
    workload = all_workloads()[args.workload]
    thresholds = load_thresholds(ROOT / "baselines" / "thresholds.yaml")
    cluster = RayCluster().start()
    model, cores = local_cpu()
    env = environment.fingerprint(ClusterShape(nodes=cluster.nodes(), cpu_model=model, cpu_cores=cores),
                                  backend="ray", root=ROOT)
    rows = []
    try:
        for label, batching_ms in (("unchanged", 0), ("injected", args.injected_ms)):
            dep = RayServeDeployment(topo, cluster, stream_batching_interval_ms=batching_ms, app_suffix=f"-sb{batching_ms}")
            ep = dep.start(900)
            try:
                for i in range(args.runs):
                    t0 = time.monotonic()
                    result = run_point(base_url=ep.base_url, model=ep.model_id, tokenizer_path=ep.tokenizer_path,
                                       workload=workload, point=args.point, topology=topo.name, gpus=0,
                                       metrics_urls=ep.metrics_urls, environment=dict(env))
                    gate = gate_point(ROOT / "baselines", result, thresholds)
                    if args.save_points:  # keep the raw points: a changed gate can be re-judged offline
                        from pdperf.results import save_point

                        save_point(args.save_points / f"{label}-{i}.json", result)
                    s = result.summary
                    row = {"case": label, "stream_batching_ms": batching_ms, "run": i, "status": gate.status,
                           "ttft_p50_ms": s.stat("ttft_ms", "p50"), "tpot_p50_ms": s.stat("tpot_ms", "p50"),
                           "itl_p99_ms": s.stat("itl_ms", "p99"), "e2e_mean_ms": s.stat("e2e_ms", "mean"),
                           "wall_s": round(time.monotonic() - t0, 1), "message": gate.message()}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                dep.stop()
    finally:
        cluster.stop()

    def rate(case: str) -> tuple[int, int]:
        sel = [r for r in rows if r["case"] == case]
        return sum(r["status"] == "regressed" for r in sel), len(sel)

    det, n_inj = rate("injected")
    fa, n_ok = rate("unchanged")
    print(f"\n{topo.name} / {workload.name} / {workload.sweep.point_id(args.point)} on {env['hardware_id']}:")
    print(f"  detection rate   (stream batching {args.injected_ms} ms flagged regressed): {det}/{n_inj}")
    print(f"  false-alarm rate (unchanged configuration flagged regressed):      {fa}/{n_ok}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "detection": [det, n_inj], "false_alarm": [fa, n_ok]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
