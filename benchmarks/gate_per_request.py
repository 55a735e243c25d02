"""Per-token gates: judged over requests against judged over pooled gaps, side by side.

The gaps of one request move together (4x H100, PD 1P1D c1: one request's median ITL 18 ms, the
next one's 37 ms), so pooled gaps overstate how sure the gate can be. This simulates runs with
that structure — each request a pace drawn once (lognormal), its gaps around that pace — and
prints, for each way of judging the p50 ITL gate (+15%), how often identical runs are flagged
``regressed`` (false alarms) and how often a real slowdown is (detection). Seeded; the same
arguments give the same table. The real-data check is tests/selftest/test_gate_per_request.py.

    .venv/bin/python benchmarks/gate_per_request.py [--requests 16] [--gaps 255] [--spread 0.25] [--trials 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdperf.gate import Gate, judge_metric  # noqa: E402

GATE = Gate(metric="itl_ms", statistic="p50", max_change=0.15, direction="lower-is-better")


def run(rng: np.random.Generator, requests: int, gaps: int, spread: float, slow: float = 1.0) -> list[np.ndarray]:
    pace = np.exp(rng.normal(0, spread, requests))
    return [20.0 * slow * p * np.exp(rng.normal(0, 0.15, gaps)) for p in pace]


def verdict(cur: list[np.ndarray], base: list[np.ndarray], per_request: bool, resamples: int) -> str:
    kw = {}
    if per_request:
        kw = dict(current_requests=np.array([np.median(r) for r in cur]),
                  baseline_requests=np.array([np.median(r) for r in base]))
    return judge_metric(GATE, np.concatenate(cur), np.concatenate(base), alpha=0.01, ci_level=0.99,
                        resamples=resamples, **kw).verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16, help="requests a point (gpu-small c1: 16)")
    ap.add_argument("--gaps", type=int, default=255, help="gaps a request (OSL 256: 255)")
    ap.add_argument("--spread", type=float, default=0.25, help="sigma of the per-request pace (lognormal)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--slowdowns", default="1.0,1.3,1.6,2.0")
    ap.add_argument("--resamples", type=int, default=400)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    print(f"p50 ITL gate (+15%), {args.requests} requests x {args.gaps} gaps, per-request pace sigma "
          f"{args.spread}, {args.trials} trials a row")
    print(f"{'slowdown':>8}  {'pooled: regressed':>18}  {'per request: regressed':>23}")
    for slow in (float(x) for x in args.slowdowns.split(",")):
        rng = np.random.default_rng(args.seed)
        pairs = [(run(rng, args.requests, args.gaps, args.spread, slow), run(rng, args.requests, args.gaps, args.spread))
                 for _ in range(args.trials)]
        pooled = sum(verdict(c, b, False, args.resamples) == "regressed" for c, b in pairs)
        per_request = sum(verdict(c, b, True, args.resamples) == "regressed" for c, b in pairs)
        rows.append({"slowdown": slow, "pooled_regressed": pooled, "per_request_regressed": per_request,
                     "trials": args.trials})
        label = "false alarms" if slow == 1.0 else "detected"
        print(f"{slow:>8.2f}  {pooled:>8}/{args.trials} {label:<9}  {per_request:>12}/{args.trials} {label}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
