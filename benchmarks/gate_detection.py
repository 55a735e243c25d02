"""What the baseline gate detects, and how often it cries wolf, on the real stack.

The suite itself, run again and again (``pytest -m sweep``) against one deployment that stays
up between runs (a Ray head of its own, ``--keep-deployments``; each run adopts it), gated
against a baseline band recorded here from fresh runs of the same deployment. Every run goes
direct for unchanged code (as users run it), and through pdperf.inject's proxy at 0.1 / 0.2 /
0.5 for regressions of known size (every response that much slower, plus the proxy's own hop,
which the client/engine ratio below measures). The levels alternate round by round (rotated order), so drift of the machine hits them
alike. Each run's verdicts.json gives the gate's status per point, after the suite's own
confirmation by re-measurement (--confirm-regressions 1).

Per level: points flagged ``regressed`` / points judged, with a Wilson 95 % interval; at 0 that
is the false-alarm rate, above it the detection rate. How large each injection really was is
measured side by side: the client's TTFT and TPOT p50 at that level over the direct runs' (median
over rounds, per point).

    .venv/bin/python benchmarks/gate_detection.py --rounds 10 --json benchmarks/results/DATE-gate-detection-cpu.json

On 2 cores every other job on the machine is part of the measurement: run it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def pytest_run(args: argparse.Namespace, run_dir: Path, baselines: Path, extra: list[str]) -> dict:
    cmd = [PY, "-m", "pytest", "-m", "sweep", "-q", "-p", "no:randomly", "--ray-address", "auto",
           "--keep-deployments", "--no-prestart", f"--topology={args.topology}", f"--workload={args.workload}",
           f"--baselines-dir={baselines}", f"--run-dir={run_dir}", *extra]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    verdicts = json.loads((run_dir / "verdicts.json").read_text()) if (run_dir / "verdicts.json").exists() else []
    if not verdicts:
        raise RuntimeError(f"pytest wrote no verdicts (exit {out.returncode}): {out.stdout[-3000:]}{out.stderr[-2000:]}")
    return {"rc": out.returncode, "wall_s": round(wall, 1), "verdicts": verdicts}


def point_stats(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Per point of a run: client TTFT and TPOT p50 (ms), to measure how large an injection really was."""
    from pdperf.results import load_point

    return {f.stem: {"ttft_p50_ms": (r := load_point(f)).summary.stat("ttft_ms", "p50"),
                     "tpot_p50_ms": r.summary.stat("tpot_ms", "p50")}
            for f in sorted((run_dir / "points").glob("*.json"))}


def reap(pids: set[int], timeout_s: float = 30.0) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
            procs[-1].terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="cpu-colloc-1xtp1")
    ap.add_argument("--workload", default="cpu-latency")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--levels", default="0,0.1,0.2,0.5", help="slowdowns, comma-separated (0 = unchanged)")
    ap.add_argument("--band-runs", type=int, default=3, help="fresh runs recorded as the baseline band")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep every run folder here")
    args = ap.parse_args()
    levels = [float(x) for x in args.levels.split(",")]  # "0,0.1,0,0.2": unchanged runs twice per round

    work = Path(tempfile.mkdtemp(prefix="pdperf-gate-detection-"))
    keep = args.keep or work / "runs"
    baselines = work / "baselines"
    baselines.mkdir(parents=True)
    shutil.copy(ROOT / "baselines" / "thresholds.yaml", baselines / "thresholds.yaml")
    env = dict(os.environ)
    from pdperf.backends.ray_serve import METRICS_REPORT_INTERVAL_MS, _engine_pids

    engines_before = _engine_pids()

    # a head like the suite's own local one (loopback, 8 logical CPUs, its metrics export interval)
    subprocess.run([BIN / "ray", "start", "--head", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                    "--num-cpus", str(max(8, os.cpu_count() or 1)), "--include-dashboard", "false",
                    "--system-config", json.dumps({"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS})],
                   cwd=ROOT, check=True, capture_output=True, env=env, timeout=300)
    rows: list[dict] = []
    try:
        for i in range(args.band_runs):  # the band: fresh direct runs, as the suite records one
            flag = "--update-baselines" if i == 0 else "--add-baseline-runs"
            run = pytest_run(args, keep / f"band-{i}", baselines, [flag])
            print(json.dumps({"band_run": i, "rc": run["rc"], "wall_s": run["wall_s"]}), flush=True)
        for r in range(args.rounds):
            order = levels[r % len(levels):] + levels[:r % len(levels)]
            for j, level in enumerate(order):  # a level may repeat (more unchanged runs per round)
                run_dir = keep / f"round{r:02d}-{j}-s{level:g}"
                # unchanged code runs direct, exactly as users run it; a regression goes through the proxy,
                # whose own cost adds to it: the client/engine TPOT ratio says how large it really was
                run = pytest_run(args, run_dir, baselines, ["--inject-slowdown", f"{level:g}"] if level else [])
                for v in run["verdicts"]:
                    gate = v.get("gate") or {}
                    if not v.get("points"):
                        continue
                    row = {"round": r, "slot": j, "slowdown": level, "test_id": v["test_id"], "outcome": v["outcome"],
                           "status": gate.get("status"), "regressed_metrics": [
                               f"{m['metric']}:{m['statistic']}" for m in gate.get("verdicts", [])
                               if m.get("verdict") == "regressed"],
                           "confirmations": [c.get("status") for c in gate.get("confirmations", [])],
                           "wall_s": run["wall_s"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                stats = point_stats(run_dir)
                for row in rows:
                    if row["round"] == r and row["slot"] == j:
                        row["stats"] = stats
    finally:
        subprocess.run([BIN / "serve", "shutdown", "-y"], cwd=ROOT, capture_output=True, timeout=300)
        subprocess.run([BIN / "ray", "stop", "--force"], cwd=ROOT, capture_output=True, timeout=300)
        # vLLM engine processes outlive `ray stop` (re-parented to init, still polling): they would
        # be part of the next measurement on this machine
        reap(_engine_pids() - engines_before)

    def median(xs: list[float]) -> float | None:
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else None

    def level_stat(level: float, stat: str) -> dict[str, float | None]:
        runs = {}  # (round, slot, point) -> value: each run's points once
        for x in rows:
            if x["slowdown"] == level:
                for pid, st in (x.get("stats") or {}).items():
                    runs[(x["round"], x["slot"], pid)] = st[stat]
        return {pid: median([v for (_, _, p), v in runs.items() if p == pid and v is not None])
                for pid in sorted({p for _, _, p in runs})}

    base = {stat: level_stat(0.0, stat) for stat in ("ttft_p50_ms", "tpot_p50_ms")}
    summary = []
    for level in levels:
        sel = [x for x in rows if x["slowdown"] == level and x["status"]]
        k = sum(x["status"] == "regressed" for x in sel)
        lo, hi = wilson(k, len(sel))
        statuses = {st: sum(x["status"] == st for x in sel) for st in sorted({x["status"] for x in sel})}
        # how much slower the client saw this level than the direct runs, per point (median over rounds)
        measured = {stat: {pid: round(v / base[stat][pid], 3) for pid, v in level_stat(level, stat).items()
                           if v and base[stat].get(pid)} for stat in base}
        summary.append({"slowdown": level, "regressed": k, "points": len(sel), "wilson95": [round(lo, 3), round(hi, 3)],
                        "statuses": statuses, "measured_ratio_vs_direct": measured})
        print(f"slowdown {level:>4g}: regressed {k}/{len(sel)} (95% {lo:.2f}-{hi:.2f}); {statuses}; "
              f"measured vs direct {measured}")
    if args.json:
        args.json.write_text(json.dumps({"topology": args.topology, "workload": args.workload, "rounds": args.rounds,
                                         "band_runs": args.band_runs, "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
