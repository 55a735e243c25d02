"""``pdperf``: the reference study's tools on top of the suite's own code.

- ``pdperf serve TOPOLOGY``   stand a topology up and keep it serving (the study's launcher)
- ``pdperf query URL``        one streamed request: TTFT and per-token timing
- ``pdperf validate``         check every topology and workload file
- ``pdperf plan TOPOLOGY``    show where a topology's engines would go on this cluster
- ``pdperf diagnose``         why a deployment is not ready (Serve, placement groups, replica logs)
- ``pdperf report RUN_DIR``   rebuild a run's report; ``pdperf compare A B`` compares runs
- ``pdperf baseline add-run RUN_DIR|POINT...``  add measured runs to their points' baseline bands;
  ``pdperf baseline show FILE [--runs]``  each point's band of runs; ``baseline remove-run FILE POINT N``

User mistakes end with one ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pdperf.errors import PdperfError
from pdperf.gate.store import BandRun

if TYPE_CHECKING:
    from pdperf.session.options import SessionOptions
from pdperf.specs import ROOT, TOPOLOGY_DIR, all_topologies, all_workloads


def _session_options(args: argparse.Namespace, *, backend: Literal["ray", "vllm", "external"] = "ray",
                     model: str | None = None) -> SessionOptions:
    """``pdperf serve`` / ``plan`` arguments as the test session's options (the same checks, the same
    backend settings); the environment's switches are read here, at the CLI's edge."""
    from pdperf.session.options import EnvSwitches, SessionOptions

    return SessionOptions(backend=backend, ray_address=args.ray_address, model_override=model,
                          topologies_dir=Path(args.topologies_dir) if args.topologies_dir else TOPOLOGY_DIR,
                          env=EnvSwitches.from_environ(os.environ))


def _topology(name: str, directory: Path = TOPOLOGY_DIR):
    if not directory.is_dir():
        raise PdperfError(f"--topologies-dir {directory}: no such folder; pass a folder of topology YAML files "
                          "(default: topologies/)")
    topos = all_topologies(directory)
    if name not in topos:
        where = "topologies/" if directory == TOPOLOGY_DIR else str(directory)
        raise PdperfError(f"topology '{name}': not in {where}; known: {', '.join(sorted(topos))}")
    return topos[name]


def cmd_serve(args: argparse.Namespace) -> int:
    from pdperf.backends.factory import make_deployment, start_cluster
    from pdperf.backends.vllm_proc import GpuLedger

    options = _session_options(args, backend=args.backend, model=args.model)
    t = _topology(args.topology, options.topologies_dir)
    cluster = None
    if options.backend == "ray":
        cluster = start_cluster(options.ray_address, metrics_report_interval_ms=options.env.metrics_report_interval_ms)
    dep = None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        # the deployment the test session would make of this topology with these options
        dep = make_deployment(options.backend_options(), t, log_dir=Path(args.log_dir), cluster=cluster,
                              ledger=GpuLedger(cuda_visible_devices=options.env.cuda_visible_devices))
        ep = dep.start(args.timeout)
        print(json.dumps({"topology": t.name, "backend": ep.backend, "url": ep.base_url, "model": ep.model_id,
                          "startup_s": round(ep.startup_s, 1), "metrics": ep.metrics_urls}), flush=True)
        print(f"serving {t.name} at {ep.base_url} (model '{ep.model_id}'); Ctrl-C to tear down", file=sys.stderr)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    finally:
        if dep is not None:
            dep.stop()
        if cluster:
            cluster.stop()
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from pdperf.loadgen.runner import single_request
    from pdperf.metrics import itl_ms, tpot_ms, ttft_ms

    model = args.model
    if not model:
        import urllib.request

        with urllib.request.urlopen(args.url.rstrip("/") + "/v1/models", timeout=30) as resp:
            model = json.load(resp)["data"][0]["id"]
    rec, text = single_request(args.url.rstrip("/"), model, args.prompt, args.max_tokens, api=args.api)
    if rec.error:
        raise PdperfError(f"{args.url}: request failed: {rec.error}: {rec.error_detail}")
    itl = itl_ms(rec)
    out = {"model": model, "output_tokens": rec.output_tokens, "ttft_ms": round(ttft_ms(rec) or 0, 2),
           "tpot_ms": round(tpot_ms(rec) or 0, 2), "chunks": len(rec.chunk_times_s),
           "itl_ms": [round(x, 2) for x in itl], "text": text}
    print(json.dumps(out, indent=1))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    topos, wls = all_topologies(), all_workloads()
    print(f"{len(topos)} topologies and {len(wls)} workloads are valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pdperf.backends.factory import start_cluster
    from pdperf.placement import plan
    from pdperf.session.runtime import local_nodes

    options = _session_options(args)
    t = _topology(args.topology, options.topologies_dir)
    if options.ray_address:
        cluster = start_cluster(options.ray_address, metrics_report_interval_ms=options.env.metrics_report_interval_ms)
        nodes = cluster.nodes()
        cluster.stop()
    else:
        nodes = local_nodes()
    p = plan(t, nodes)
    print(json.dumps({"topology": t.name, "feasible": p.feasible, "reason": p.reason,
                      "roles": {k: {"node": v.node_ip, **v.placement_group_config} for k, v in p.roles.items()}},
                     indent=1))
    return 0 if p.feasible else 1


def cmd_diagnose(args: argparse.Namespace) -> int:
    from pdperf.backends.ray_serve import _check_gcs_reachable
    from pdperf.diagnose import main as diagnose

    try:
        _check_gcs_reachable(args.ray_address)
    except ConnectionError as e:
        raise PdperfError(f"--ray-address {args.ray_address}: {e}; is Ray running (`ray status`)?") from None
    print(diagnose(args.ray_address, args.lines), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pdperf.report import build_report

    print(build_report(Path(args.run_dir)))
    return 0


def cmd_baseline_add_run(args: argparse.Namespace) -> int:
    from pdperf.compare import load_input
    from pdperf.gate.store import write_baseline
    from pdperf.gate.thresholds import BASELINE_ROOT

    points = [p for path in args.inputs for p in load_input(Path(path)).points.values()]
    if not points:
        raise PdperfError(f"{', '.join(args.inputs)}: no point results; pass run folders (reports/<run-id>) or "
                          "point JSON files")
    root = Path(args.baselines_dir) if args.baselines_dir else BASELINE_ROOT
    # every point is checked before anything is written (a flagged point is refused, naming its flag)
    paths = write_baseline(root, points, add_run=True, allow_flagged=args.allow_flagged)
    print(_bands_text(paths, {p.point_id for p in points}))
    return 0


def cmd_baseline_show(args: argparse.Namespace) -> int:
    print(_bands_text([Path(f) for f in args.files], runs=args.runs))
    return 0


def cmd_baseline_remove_run(args: argparse.Namespace) -> int:
    from pdperf.gate.store import remove_band_run

    run = remove_band_run(Path(args.file), args.point, args.number)
    print(f"removed run {args.number} of {args.point} ({_run_text(run)})")
    print(_bands_text([Path(args.file)], {args.point}, runs=True))
    return 0


def cmd_baseline_migrate(args: argparse.Namespace) -> int:
    """Rewrite baseline files (schema 1, as older versions wrote them) as schema 2; files already
    at schema 2 are left as they are."""
    import json

    from pdperf.gate.store import committed_baseline_files, load_baseline_file, write_baseline_file

    files: list[Path] = []
    for item in args.paths:
        p = Path(item)
        files.extend(committed_baseline_files(p) if p.is_dir() else [p])
    if not files:
        raise PdperfError(f"{', '.join(args.paths)}: no baseline files (<hardware_id>/<topology>/<workload>.json)")
    for f in files:
        before = json.loads(f.read_text()).get("schema_version") if f.exists() else None
        b = load_baseline_file(f)  # validates (schema 1 through the migration); raises naming the file
        if before != b.data.schema_version:
            write_baseline_file(f, b.data)
        print(f"{f}: schema {before} -> {b.data.schema_version}" if before != b.data.schema_version
              else f"{f}: schema {before}, unchanged")
    return 0


def _run_text(run: BandRun) -> str:
    vals = ", ".join(f"p50 {m} {v:.3g}" for m in ("ttft_ms", "tpot_ms") if (v := run.stat(m, "p50")) is not None)
    return f"{run.started_at or '?'}, git {(run.git_sha or '?')[:12]}: {vals}"


def _bands_text(files: list[Path], point_ids: set[str] | None = None, *, runs: bool = False) -> str:
    """Per baseline file and point: each run's p50 TTFT and TPOT and the band's spread (worst / best);
    with ``runs``, a line per run (numbered as ``baseline remove-run`` takes them)."""
    from pdperf.gate.store import load_baseline_file

    lines = []
    for f in files:
        b = load_baseline_file(f)
        lines.append(f"{f}  ({b.hardware_id}{', retired: ' + b.retired if b.retired else ''})")
        for pid, entry in b.points.items():
            if point_ids and pid not in point_ids:
                continue
            band = entry.runs
            cells = []
            for metric in ("ttft_ms", "tpot_ms"):
                vals = [v for r in band if (v := r.stat(metric, "p50")) is not None]
                spread = f" (x{max(vals) / min(vals):.2f})" if len(vals) > 1 and min(vals) > 0 else ""
                cells.append(f"p50 {metric} {' '.join(f'{v:.3g}' for v in vals)}{spread}")
            lines.append(f"  {pid:<8} {len(band)} run{'s' if len(band) != 1 else ''}: {'; '.join(cells)}")
            if runs:
                lines.extend(f"    #{i} {_run_text(r)}" for i, r in enumerate(band, 1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # its own parser: argparse.REMAINDER would refuse `pdperf compare -h` / `--html X A B`
        from pdperf.compare import main as compare_main

        return compare_main(argv[1:], prog="pdperf compare")
    if argv[:1] == ["planner"]:  # which P:D ratio and TP per role: its own parser (docs/PLANNER.md)
        from pdperf.planner.cli import main as planner_main

        return planner_main(argv[1:], prog="pdperf planner")
    ap = argparse.ArgumentParser(prog="pdperf", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="stand a topology up and keep it serving")
    s.add_argument("topology")
    s.add_argument("--backend", choices=("ray", "vllm"), default="ray")
    s.add_argument("--ray-address", default=None)
    s.add_argument("--model", default=None, help="model for GPU topologies (key or folder)")
    s.add_argument("--timeout", type=float, default=900.0)
    s.add_argument("--log-dir", default=str(ROOT / "reports" / "serve-logs"))
    s.add_argument("--topologies-dir", default=None, metavar="DIR", help="topology files (default: topologies/)")
    s.set_defaults(fn=cmd_serve)
    q = sub.add_parser("query", help="one streamed request with TTFT and per-token timing")
    q.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000/cpu-pd-1p1-1d1")
    q.add_argument("--model", default=None, help="model id (default: the first the server lists)")
    q.add_argument("--prompt", default="def fibonacci(n):\n    ")
    q.add_argument("--max-tokens", type=int, default=32)
    q.add_argument("--api", choices=("completions", "chat"), default="completions")
    q.set_defaults(fn=cmd_query)
    v = sub.add_parser("validate", help="validate every topology and workload file")
    v.set_defaults(fn=cmd_validate)
    p = sub.add_parser("plan", help="show the placement of a topology on this cluster")
    p.add_argument("topology")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--topologies-dir", default=None, metavar="DIR", help="topology files (default: topologies/)")
    p.set_defaults(fn=cmd_plan)
    d = sub.add_parser("diagnose", help="why is a deployment not ready: Serve, placement groups, replica logs, GPUs")
    d.add_argument("--ray-address", default="auto")
    d.add_argument("--lines", type=int, default=40, help="log lines per replica and of the Serve controller")
    d.set_defaults(fn=cmd_diagnose)
    r = sub.add_parser("report", help="rebuild a run folder's report")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)
    b = sub.add_parser("baseline", help="baseline bands: add measured runs, show the spread between runs")
    bsub = b.add_subparsers(dest="action", required=True)
    ba = bsub.add_parser("add-run", help="add run folders' (or point files') points to their baselines' bands "
                                         "(a point without a baseline gets one)")
    ba.add_argument("inputs", nargs="+", metavar="RUN_DIR|POINT_JSON")
    ba.add_argument("--baselines-dir", default=None, help="baseline store (default baselines/)")
    ba.add_argument("--allow-flagged", action="store_true",
                    help="add points even when flagged (client lag, restarts): they would widen the band")
    ba.set_defaults(fn=cmd_baseline_add_run)
    bs = bsub.add_parser("show", help="each point's runs and their spread")
    bs.add_argument("files", nargs="+", metavar="BASELINE_JSON")
    bs.add_argument("--runs", action="store_true", help="a line per run, numbered as remove-run takes them")
    bs.set_defaults(fn=cmd_baseline_show)
    br = bsub.add_parser("remove-run", help="drop one run from a point's band (one added by mistake)")
    br.add_argument("file", metavar="BASELINE_JSON")
    br.add_argument("point", metavar="POINT_ID", help="e.g. c4")
    br.add_argument("number", type=int, metavar="N", help="the run's number in `baseline show --runs` (2 or more)")
    br.set_defaults(fn=cmd_baseline_remove_run)
    bm = bsub.add_parser("migrate", help="rewrite baseline files of an older schema as the current one")
    bm.add_argument("paths", nargs="+", metavar="BASELINE_JSON|BASELINES_DIR")
    bm.set_defaults(fn=cmd_baseline_migrate)
    sub.add_parser("compare", help="compare runs or a run against its baselines (pdperf compare -h)", add_help=False)
    sub.add_parser("planner", help="predict PD/collocated layouts from measured profiles, search under an SLO "
                                   "(pdperf planner -h)", add_help=False)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except PdperfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
