"""The planner against the suite's own PD points: fit on collocated runs, predict the PD ones.

The question: given only collocated measurements of a machine, how far off is the planner on
the PD layouts of the same workload that the suite then measured? The data are the archived
4x H100 runs (benchmarks/results/gpu-runs/*.tar.xz: eager engines, Llama-3.1-8B shapes,
`gpu-small-isl1024-osl256`, closed loop c1..c64). Their point files were never kept, so the
points come from each run folder's results.csv (pdperf.planner.results_csv).

- Fit: every collocated run measured alone on its machine (the sets docs/RESULTS.md uses:
  colloc-2xtp1, colloc-1xtp2, colloc-2xtp2; 21 points, 3 configurations, TP1 and TP2).
- Predict: every PD point of the same workload (pd-1p1-1d1-pack, pd-1p2-1d2-pack; 9 points),
  with the profile's 90 % interval. Nothing of them was used in the fit.
- Then, to see how much of the error only PD points can remove (the PD path's overhead, a
  prompt's cost on a prefill engine against a collocated one), each PD configuration is
  predicted again by a fit to the collocated runs plus the other PD configuration.
- Left out: session 3's points (flagged replica restarts), session 4's (the PD application
  sat idle beside them), the smoke tier's c4 points (another OSL, 32 requests).

Archives are extracted under ``--extract-to`` (a temporary folder, never the repository).

    .venv/bin/python benchmarks/planner_own_runs.py [--bootstrap 20] \
        [--out benchmarks/results/planner-own-runs-h100-x4.csv] \
        [--profile-out benchmarks/results/planner-own-runs-h100-x4.profile.json]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shlex
import statistics
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdperf.planner.facts import model_facts  # noqa: E402
from pdperf.planner.fit import REPORT_METRICS, calibrate  # noqa: E402
from pdperf.planner.predict import PointComparison, predict_interval  # noqa: E402
from pdperf.planner.profiles import MeasuredPoint, PlannerError, save_profile  # noqa: E402
from pdperf.planner.results_csv import load_results_csv, run_identity  # noqa: E402
from pdperf.results import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCHIVES = ROOT / "benchmarks" / "results" / "gpu-runs"
WORKLOAD = "gpu-small-isl1024-osl256"

#: (archive, run folder): collocated runs measured alone (docs/RESULTS.md sections 1 and 2).
COLLOCATED_RUNS = (
    ("h100-x4-2026-11-27d", "ray-record-colloc-2xtp1"),
    ("h100-x4-2026-11-27d", "ray-gate-colloc-2xtp1"),
    ("h100-x4-2026-11-27e", "ray-alone-colloc-2xtp1"),
    ("h100-x4-2026-11-27f", "ray-alone-colloc-2xtp1"),
    ("h100-x4-2026-11-27e", "ray-record-colloc-1xtp2"),
    ("h100-x4-2026-11-27g", "ray-alone-colloc-1xtp2"),
    ("h100-x4-2026-11-27f", "ray-record-colloc-2xtp2"),
    ("h100-x4-2026-11-27f", "ray-adopted-colloc-2xtp2"),
)
#: PD runs of the same workload: predicted, never fitted.
PD_RUNS = (
    ("h100-x4-2026-11-27c", "ray-record-pd-1p1-1d1-pack"),
    ("h100-x4-2026-11-27c", "ray-gate-pd-1p1-1d1-pack"),
    ("h100-x4-2026-11-27e", "ray-alone-pd-1p1-1d1-pack"),
    ("h100-x4-2026-11-27f", "ray-record-pd-1p2-1d2-pack"),
)

METRIC_LABELS = {"med_ttft_ms": "TTFT p50", "p99_ttft_ms": "TTFT p99", "med_tpot_ms": "TPOT p50",
                 "out_tok_s": "output tok/s"}
COLUMNS = ("fit", "run", "config", "gpus", "concurrency", "isl", "osl", "requests",
           *(f"{m}_{k}" for m in REPORT_METRICS for k in ("measured", "predicted", "lo", "hi", "error_pct", "within")),
           "interval_level", "bottleneck", "notes")


def extract(archives: Path, dest: Path, names: set[str]) -> None:
    """Each archive named once under ``dest`` (skipped when its folder is already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        if (dest / name).is_dir():
            continue
        with tarfile.open(archives / f"{name}.tar.xz") as tar:
            tar.extractall(dest, filter="data")


def load(dest: Path, runs: tuple[tuple[str, str], ...]) -> tuple[list[MeasuredPoint], str, str]:
    points: list[MeasuredPoint] = []
    ids: set[tuple[str, str]] = set()
    for archive, run in runs:
        folder = dest / archive / run
        ids.add(run_identity(folder))
        for p in load_results_csv(folder, workloads=[WORKLOAD]):
            points.append(MeasuredPoint(**{**p.__dict__, "source": f"{archive}/{run}"}))
    if len(ids) != 1:
        raise PlannerError(f"runs of more than one hardware / model: {sorted(ids)}")
    hardware, model = ids.pop()
    return points, hardware, model


def compare(profile, points: list[MeasuredPoint], level: float) -> list[PointComparison]:
    return [PointComparison(measured=p, predicted=predict_interval(profile, p.deployment, p.point, level=level))
            for p in points]


def mdape(comparisons: list[PointComparison], metric: str) -> float:
    errs = [abs(e) for e in (c.error_pct(metric) for c in comparisons) if e is not None]
    return statistics.median(errs) if errs else math.nan


def median_signed(comparisons: list[PointComparison], metric: str) -> float:
    errs = [e for e in (c.error_pct(metric) for c in comparisons) if e is not None]
    return statistics.median(errs) if errs else math.nan


def csv_text(sets: list[tuple[str, list[PointComparison]]], level: float) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for fit, comparisons in sets:
        for c in comparisons:
            w.writerow(_row(fit, c, level))
    return buf.getvalue()


def _row(fit: str, c: PointComparison, level: float) -> list[object]:
    def r(v: float | None, nd: int) -> str:
        return "" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"

    m, pred = c.measured, c.predicted.prediction
    row: list[object] = [fit, m.source, m.config, m.deployment.gpus, int(m.point.value), m.point.isl, m.point.osl,
                         m.requests or ""]
    for metric in REPORT_METRICS:
        nd = 2 if metric == "med_tpot_ms" else 1
        iv = c.predicted.interval(metric)
        within = c.within_interval(metric)
        row += [r(m.value(metric), nd), r(pred.metric(metric), nd), r(iv.lo, nd), r(iv.hi, nd),
                r(c.error_pct(metric), 1), "" if within is None else ("yes" if within else "no")]
    row += [f"{level:g}", pred.bottleneck, "; ".join(c.predicted.extrapolations)]
    return row


def summary(comparisons: list[PointComparison]) -> str:
    lines = [f"{'metric':<14} {'MdAPE':>7} {'median signed':>14} {'in interval':>12}"]
    for metric in REPORT_METRICS:
        inside = [c.within_interval(metric) for c in comparisons]
        known = [x for x in inside if x is not None]
        lines.append(f"{METRIC_LABELS[metric]:<14} {mdape(comparisons, metric):>6.1f}% "
                     f"{median_signed(comparisons, metric):>+13.1f}% {sum(known):>5}/{len(known):<6}")
    return "\n".join(lines)


def _print_quality(profile) -> None:
    cal = profile.calibration
    assert cal is not None
    print(f"{'metric':<14} {'in-sample':>10} {'leave-one-config-out':>21}")
    for metric in REPORT_METRICS:
        q = cal.quality[metric]
        loco = f"{q.leave_one_config_out_mdape:.1f}%" if q.leave_one_config_out_mdape is not None else "-"
        print(f"{METRIC_LABELS[metric]:<14} {q.in_sample_mdape:>9.1f}% {loco:>21}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archives", type=Path, default=ARCHIVES)
    ap.add_argument("--extract-to", type=Path, default=Path(tempfile.gettempdir()) / "pdperf-gpu-runs")
    ap.add_argument("--bootstrap", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=None, help="comparison CSV (default: stdout)")
    ap.add_argument("--profile-out", type=Path, default=None, help="write the collocated profile here")
    ap.add_argument("--no-cross-pd", action="store_true",
                    help="skip the second question (each PD configuration predicted from a fit that includes "
                         "the collocated runs and the other PD configuration)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if ROOT in args.extract_to.resolve().parents or args.extract_to.resolve() == ROOT:
        raise SystemExit(f"--extract-to {args.extract_to}: inside the repository; use a temporary folder")
    extract(args.archives, args.extract_to, {a for a, _ in COLLOCATED_RUNS + PD_RUNS})
    colloc, hardware, model = load(args.extract_to, COLLOCATED_RUNS)
    pd, pd_hardware, pd_model = load(args.extract_to, PD_RUNS)
    if (pd_hardware, pd_model) != (hardware, model):
        raise SystemExit(f"PD runs are {pd_hardware}/{pd_model}, collocated ones {hardware}/{model}")
    say = None if args.quiet else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    command = "benchmarks/planner_own_runs.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = model_facts(model)
    profile = calibrate(colloc, hardware_id=hardware, model=model, facts=facts,
                        source=[f"{a}/{r}/results.csv" for a, r in COLLOCATED_RUNS], bootstrap=args.bootstrap,
                        seed=args.seed, command=command, created_at=created, progress=say)
    if args.profile_out:
        save_profile(args.profile_out, profile)
    cal = profile.calibration
    assert cal is not None
    print(f"profile {hardware} / {model}: {cal.points} collocated points of {', '.join(cal.configs)}")
    _print_quality(profile)
    print("fitted: " + ", ".join(cal.fitted))
    for k, why in cal.assumed.items():
        print(f"assumed {k}: {why}")
    comparisons = compare(profile, pd, args.level)
    sets = [("collocated", comparisons)]
    print(f"\nPD points predicted from the collocated profile ({len(comparisons)} points; error = "
          "predicted / measured - 1):")
    print(summary(comparisons))
    for config in sorted({c.measured.config for c in comparisons}):
        sub = [c for c in comparisons if c.measured.config == config]
        print(f"\n{config} ({len(sub)} points):")
        print(summary(sub))
    if not args.no_cross_pd:
        # How much of the error is what only PD points can teach (the PD path's overhead, the prompt
        # cost on a prefill engine)? Each PD configuration predicted by a fit to the collocated runs and
        # the other PD configuration (no bootstrap: the interval is the leave-one-config-out residuals').
        cross: list[PointComparison] = []
        for config in sorted({p.config for p in pd}):
            train = colloc + [p for p in pd if p.config != config]
            other = sorted({p.config for p in pd if p.config != config})
            if say:
                say(f"cross-PD: fitting collocated + {', '.join(other)}, predicting {config}")
            prof = calibrate(train, hardware_id=hardware, model=model, facts=facts,
                             source=[f"collocated + {', '.join(other)}"], bootstrap=0, seed=args.seed,
                             command=command, created_at=created)
            print(f"\nfit on collocated + {', '.join(other)} ({len(train)} points):")
            _print_quality(prof)
            got = compare(prof, [p for p in pd if p.config == config], args.level)
            print(f"{config} predicted ({len(got)} points):")
            print(summary(got))
            sets.append((f"collocated+{'+'.join(other)}", got))
            cross += got
        print(f"\nboth PD configurations, each predicted with the other in the fit ({len(cross)} points):")
        print(summary(cross))
    text = csv_text(sets, args.level)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"\n{sum(len(c) for _, c in sets)} comparisons -> {args.out}")
    else:
        sys.stdout.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
