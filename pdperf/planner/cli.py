"""``python -m pdperf.planner``: calibrate a profile, predict configurations, search layouts.

- ``calibrate``  a study CSV (``--csv``) or the suite's run folders (``--runs``) -> profile JSON
- ``predict``    profile + configurations + load points -> CSV with intervals
- ``search``     profile + workload + SLO + GPU budget -> ranked table (``--write-topologies DIR``)

User mistakes (a missing file, a bad column, an impossible budget) end with one ``error:``
line naming the thing and the fix, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from pdperf.errors import PdperfError
from pdperf.planner.model import Deployment, WorkloadPoint
from pdperf.planner.profiles import (
    KVTransferParams,
    MeasuredPoint,
    PlannerError,
    load_profile,
    load_run_points,
    load_study_csv,
    profile_path,
    save_profile,
)
from pdperf.results import atomic_write_text

PROG = "python -m pdperf.planner"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (raised, then printed by ``main``)."""

    def error(self, message: str):  # type: ignore[override]
        raise PlannerError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _numbers(text: str, what: str, *, whole: bool = False) -> list[float]:
    try:
        vals = [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise PlannerError(f"--{what} '{text}': expected numbers like 4,8,16") from None
    if not vals or any(v <= 0 or not math.isfinite(v) for v in vals):
        raise PlannerError(f"--{what} '{text}': every value must be > 0")
    if whole and any(v != int(v) for v in vals):
        raise PlannerError(f"--{what} '{text}': concurrency values are whole numbers")
    return vals


_COLLOC = re.compile(r"^(?:colloc-)?(\d+)xtp(\d+)$", re.I)
_PD_LABEL = re.compile(r"^(\d+)p-tp(\d+):(\d+)d-tp(\d+)(?:[-@](pack|spread|any))?$", re.I)
_PD_NAME = re.compile(r"^pd-(\d+)p(\d+)-(\d+)d(\d+)(?:-(pack|spread|any))?$", re.I)


def parse_config(text: str) -> Deployment:
    """``2xTP4``, ``colloc-2xtp4``, ``1P-TP2:3D-TP2[-spread]``, ``pd-1p2-3d2-pack`` or a topologies/ name."""
    t = text.strip()
    m = _COLLOC.match(t)
    try:
        if m:
            return Deployment.collocated(int(m.group(1)), int(m.group(2)))
        m = _PD_LABEL.match(t) or _PD_NAME.match(t)
        if m:
            rp, tp_p, rd, tp_d = (int(m.group(i)) for i in range(1, 5))
            if tp_p > tp_d:
                raise PlannerError(f"--config {t}: prefill TP {tp_p} > decode TP {tp_d}, which NixlConnector does not "
                                   "support; make decode TP >= prefill TP")
            return Deployment.pd(rp, tp_p, rd, tp_d, (m.group(5) or "pack").lower())  # type: ignore[arg-type]
    except ValueError as e:
        raise PlannerError(f"--config {t}: {e}") from None
    from pdperf.errors import SpecError
    from pdperf.specs import TOPOLOGY_DIR, load_topology

    path = TOPOLOGY_DIR / f"{t}.yaml"
    if path.is_file():
        try:
            return Deployment.from_topology(load_topology(path))
        except SpecError as e:
            raise PlannerError(str(e)) from None
    raise PlannerError(f"--config {t}: not a configuration; write 2xTP4, 1P-TP2:3D-TP2 (optionally -spread), "
                       "colloc-2xtp4, pd-1p2-3d2-pack or a name in topologies/")


def _points(args: argparse.Namespace) -> list[WorkloadPoint]:
    if (args.concurrency is None) == (args.rate is None):
        raise PlannerError("give the load as --concurrency LIST (closed loop) or --rate LIST (req/s, open loop)")
    if args.isl < 1 or args.osl < 1:
        raise PlannerError(f"--isl {args.isl} / --osl {args.osl}: both must be >= 1")
    if args.concurrency is not None:
        return [WorkloadPoint(args.isl, args.osl, "concurrency", v, args.requests_per_slot)
                for v in _numbers(args.concurrency, "concurrency", whole=True)]
    if args.requests_per_slot is not None:
        raise PlannerError("--requests-per-slot describes a closed-loop run; drop it with --rate")
    return [WorkloadPoint(args.isl, args.osl, "rate", v) for v in _numbers(args.rate, "rate")]


def _profile(args: argparse.Namespace):
    return load_profile(Path(args.profile), hardware_id=getattr(args, "hardware_id", None),
                        model=getattr(args, "model", None))


def _command(argv: Sequence[str], prog: str = PROG) -> str:
    return f"{prog} {shlex.join(argv)}"


# ----------------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pdperf.planner.facts import model_facts
    from pdperf.planner.fit import REPORT_METRICS, calibrate

    if bool(args.csv) == bool(args.runs):
        raise PlannerError("calibrate: give --csv FILE (a study's sweeps) or --runs DIR... (the suite's run folders)")
    points: list[MeasuredPoint]
    if args.csv:
        if not args.hardware_id or not args.model:
            raise PlannerError("calibrate --csv: the CSV does not say where it was measured; pass --hardware-id "
                               "(e.g. h100-x8-n2-efa) and --model (e.g. gpt-oss-120b)")
        points = load_study_csv(Path(args.csv), isl=args.isl, osl=args.osl, requests_per_slot=args.requests_per_slot)
        hardware_id, model, source = args.hardware_id, args.model, [str(args.csv)]
    else:
        points, hardware_id, model = load_run_points([Path(p) for p in args.runs])
        hardware_id = args.hardware_id or hardware_id
        model = args.model or model
        source = [str(p) for p in args.runs]
    if args.exclude:
        drop = set(args.exclude)
        unknown = drop - {p.config for p in points}
        if unknown:
            raise PlannerError(f"--exclude {', '.join(sorted(unknown))}: no such config in the data (configs: "
                               f"{', '.join(sorted({p.config for p in points}))})")
        points = [p for p in points if p.config not in drop]
    facts = model_facts(model, weights_gb=args.weights_gb, kv_bytes_per_token=args.kv_bytes_per_token)
    transfer = KVTransferParams()
    if args.kv_pack_gb_s or args.kv_spread_gb_s:
        transfer = KVTransferParams(pack_gb_s=args.kv_pack_gb_s or transfer.pack_gb_s,
                                    spread_gb_s=args.kv_spread_gb_s or transfer.spread_gb_s,
                                    source=f"given: {args.kv_pack_gb_s or transfer.pack_gb_s:g} GB/s on one node, "
                                           f"{args.kv_spread_gb_s or transfer.spread_gb_s:g} GB/s across nodes")
    if args.out:
        out = Path(args.out)
    elif args.store:
        out = profile_path(Path(args.store), hardware_id, model)
    else:
        raise PlannerError("calibrate: pass --out FILE.json or --store DIR (writes DIR/<hardware-id>/<model>.json)")
    say = (lambda m: print(f"  {m}", file=sys.stderr, flush=True)) if not args.quiet else None
    profile = calibrate(points, hardware_id=hardware_id, model=model, facts=facts, source=source,
                        bootstrap=args.bootstrap, seed=args.seed, gpu_memory_gb=args.gpu_memory_gb,
                        memory_utilization=args.memory_utilization, kv_transfer=transfer, command=args.command_line,
                        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), progress=say)
    save_profile(out, profile)
    cal = profile.calibration
    assert cal is not None
    print(f"profile {hardware_id} / {model}: {cal.points} points of {len(cal.configs)} configurations -> {out}")
    print(f"{'metric':<12} {'in-sample MdAPE':>16} {'leave-one-config-out MdAPE':>27}")
    for m in REPORT_METRICS:
        q = cal.quality[m]
        loco = f"{q.leave_one_config_out_mdape:.1f}%" if q.leave_one_config_out_mdape is not None else "-"
        print(f"{m:<12} {q.in_sample_mdape:>15.1f}% {loco:>27}")
    print("fitted: " + ", ".join(cal.fitted))
    for k, why in cal.assumed.items():
        print(f"assumed {k}: {why}")
    return 0


PREDICT_COLUMNS = ("config", "kind", "placement", "prefill_replicas", "prefill_tp", "decode_replicas", "decode_tp",
                   "gpus", "load", "concurrency", "rate", "isl", "osl",
                   "med_ttft_ms", "med_ttft_ms_lo", "med_ttft_ms_hi", "p99_ttft_ms", "p99_ttft_ms_lo",
                   "p99_ttft_ms_hi", "med_tpot_ms", "med_tpot_ms_lo", "med_tpot_ms_hi", "out_tok_s", "out_tok_s_lo",
                   "out_tok_s_hi", "out_tok_s_per_gpu", "interval_level", "bottleneck", "decode_batch_per_engine",
                   "notes")


def cmd_predict(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pdperf.planner.predict import predict_interval

    profile = _profile(args)
    if not args.config:
        raise PlannerError("predict: name at least one --config (e.g. --config 1P-TP2:3D-TP2 --config 2xTP4)")
    deployments = [parse_config(c) for c in args.config]
    points = _points(args)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PREDICT_COLUMNS)

    def r(v: float, nd: int = 1) -> str:
        return "" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"

    for dep in deployments:
        for pt in points:
            pi = predict_interval(profile, dep, pt, level=args.level)
            p = pi.prediction
            row = [dep.label, dep.kind, dep.placement if dep.kind == "pd" else "", dep.prefill_replicas,
                   dep.prefill_tp, dep.decode_replicas, dep.decode_tp, dep.gpus, pt.load,
                   int(pt.value) if pt.load == "concurrency" else "", pt.value if pt.load == "rate" else "",
                   pt.isl, pt.osl]
            for m, nd in (("med_ttft_ms", 0), ("p99_ttft_ms", 0), ("med_tpot_ms", 2), ("out_tok_s", 0)):
                iv = pi.interval(m)
                row += [r(p.metric(m), nd), r(iv.lo, nd), r(iv.hi, nd)]
            row += [r(p.out_tok_s_per_gpu, 0), f"{args.level:g}", p.bottleneck, r(p.decode_batch, 1),
                    "; ".join(pi.extrapolations)]
            w.writerow(row)
    if args.out:
        atomic_write_text(Path(args.out), buf.getvalue())
        print(f"{len(deployments) * len(points)} predictions -> {args.out}")
    else:
        sys.stdout.write(buf.getvalue())
    return 0


def cmd_search(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pdperf.planner.search import NodeShape, format_table, parse_slos, search, write_topologies

    profile = _profile(args)
    points = _points(args)
    slos = parse_slos(args.slo or [])
    tps = [int(t) for t in _numbers(args.tps, "tps", whole=True)]
    budgets = [int(g) for g in args.gpus]
    if args.nodes and len(args.nodes) != len(budgets):
        raise PlannerError(f"--nodes: give one node count per --gpus value ({len(budgets)}), or none to derive them")
    out_lines = [f"# {args.command_line}", f"# profile: {args.profile} ({profile.hardware_id} / {profile.model}); "
                 f"model assumptions: docs/PLANNER.md", ""]
    best_for_topologies = None
    for i, budget in enumerate(budgets):
        nodes = args.nodes[i] if args.nodes else max(1, math.ceil(budget / args.gpus_per_node))
        shape = NodeShape(args.gpus_per_node, nodes)
        for pt in points:
            res = search(profile, pt, slos, budget=budget, shape=shape, tps=tps, refine=args.refine, level=args.level)
            out_lines.append(format_table(res, top=args.top))
            if args.full_budget_top:  # a search of its own, so its leaders get their own P(SLO) and P(best)
                try:
                    full = search(profile, pt, slos, budget=budget, shape=shape, tps=tps, min_gpus=budget,
                                  refine=args.refine, level=args.level)
                except PlannerError:
                    full = None
                if full is not None:
                    out_lines.append(format_table(full, top=args.full_budget_top,
                                                  title=f"  ... layouts using all {budget} GPUs "
                                                        f"({full.evaluated}; P(best) among these):"))
                cal_tps = sorted(set(profile.calibration.tps) & set(tps)) if profile.calibration else []
                if full is not None and cal_tps and any(c.extrapolations for c in full.candidates):
                    try:  # the same question within the TPs the profile has seen: no TP extrapolation
                        within = search(profile, pt, slos, budget=budget, shape=shape, tps=cal_tps, min_gpus=budget,
                                        refine=args.refine, level=args.level)
                        out_lines.append(format_table(within, top=args.full_budget_top,
                                                      title=f"  ... layouts using all {budget} GPUs with calibrated "
                                                            f"TPs {cal_tps} only ({within.evaluated}; P(best) "
                                                            "among these):"))
                    except PlannerError:
                        pass
            out_lines.append("")
            best_for_topologies = best_for_topologies or res
    text = "\n".join(out_lines).rstrip() + "\n"
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"ranking -> {args.out}")
    else:
        sys.stdout.write(text)
    if args.write_topologies:
        if len(budgets) * len(points) > 1:
            raise PlannerError("--write-topologies: give one --gpus value and one load point, so the topologies "
                               "written are the ranking of one question")
        assert best_for_topologies is not None
        paths = write_topologies(best_for_topologies, Path(args.write_topologies), model=profile.model,
                                 count=args.write_count, max_model_len=args.max_model_len)
        for p in paths:
            print(f"topology -> {p}")
        if not paths:
            print("no layout meets the SLO; no topology written")
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    ap = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def workload(p: argparse.ArgumentParser) -> None:
        p.add_argument("--isl", type=int, required=True, help="prompt tokens per request")
        p.add_argument("--osl", type=int, required=True, help="output tokens per request")
        p.add_argument("--concurrency", default=None, help="closed-loop points, e.g. 4,8,16")
        p.add_argument("--rate", default=None, help="open-loop points in req/s, e.g. 2,5,10")
        p.add_argument("--requests-per-slot", type=int, default=None,
                       help="model a finite closed-loop run as vllm bench serve makes it (the study: 5); "
                            "default: the steady state")

    def profile_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", required=True, help="profile JSON (or a store folder with --hardware-id/--model)")
        p.add_argument("--hardware-id", default=None)
        p.add_argument("--model", default=None)
        p.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")

    c = sub.add_parser("calibrate", help="fit a profile to a study CSV or to run folders")
    c.add_argument("--csv", default=None, help="a CSV in the reference study's calibration format")
    c.add_argument("--runs", nargs="+", default=None, help="run folders (reports/<run-id>) or point JSON files")
    c.add_argument("--isl", type=int, default=None, help="prompt tokens (a CSV without an isl column)")
    c.add_argument("--osl", type=int, default=None, help="output tokens (a CSV without an osl column)")
    c.add_argument("--requests-per-slot", type=int, default=None,
                   help="requests per concurrency slot (default: the CSV's requests / concurrency)")
    c.add_argument("--hardware-id", default=None, help="hardware fingerprint the data was measured on")
    c.add_argument("--model", default=None, help="model key (pdperf.models), e.g. gpt-oss-120b")
    c.add_argument("--exclude", action="append", default=[], help="leave a config out of the fit (repeatable)")
    c.add_argument("--out", default=None, help="profile file to write")
    c.add_argument("--store", default=None, help="profile folder: writes STORE/<hardware-id>/<model>.json")
    c.add_argument("--bootstrap", type=int, default=20, help="bootstrap refits for the uncertainty (default 20)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--gpu-memory-gb", type=float, default=80.0)
    c.add_argument("--memory-utilization", type=float, default=0.9)
    c.add_argument("--weights-gb", type=float, default=None)
    c.add_argument("--kv-bytes-per-token", type=float, default=None)
    c.add_argument("--kv-pack-gb-s", type=float, default=None, help="KV bandwidth on one node (default assumed 20)")
    c.add_argument("--kv-spread-gb-s", type=float, default=None, help="KV bandwidth across nodes (default 10)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("predict", help="predict configurations at load points -> CSV")
    profile_args(p)
    p.add_argument("--config", action="append", default=[],
                   help="2xTP4, 1P-TP2:3D-TP2[-spread], pd-1p2-3d2-pack or a topologies/ name (repeatable)")
    workload(p)
    p.add_argument("--out", default=None, help="CSV file (default: stdout)")
    p.set_defaults(fn=cmd_predict)

    s = sub.add_parser("search", help="rank layouts of a GPU budget by goodput per GPU under an SLO")
    profile_args(s)
    workload(s)
    s.add_argument("--slo", action="append", default=[], help="e.g. 'p99_ttft_ms <= 2000' (repeatable)")
    s.add_argument("--gpus", type=int, nargs="+", required=True, help="GPU budget(s), e.g. 8 16")
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--nodes", type=int, nargs="+", default=None, help="nodes per budget (default: as few as hold it)")
    s.add_argument("--tps", default="1,2,4,8", help="TP sizes to consider")
    s.add_argument("--top", type=int, default=15, help="rows per table")
    s.add_argument("--full-budget-top", type=int, default=5, help="also list the best layouts using the whole budget")
    s.add_argument("--refine", type=int, default=20, help="candidates that get bootstrap probabilities")
    s.add_argument("--out", default=None, help="text file (its first line is the command)")
    s.add_argument("--write-topologies", default=None, help="write the best layouts as topology YAML files here")
    s.add_argument("--write-count", type=int, default=5)
    s.add_argument("--max-model-len", type=int, default=16000)
    s.set_defaults(fn=cmd_search)
    return ap


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run a planner command; ``prog`` is how the user called it (``pdperf planner`` when wired there)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(argv)
        args.command_line = _command(argv, prog)
        return int(args.fn(args, argv))
    except PdperfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}; check the path and its permissions", file=sys.stderr)
        return 2
