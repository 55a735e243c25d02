"""``pdperf``: the reference study's tools on top of the suite's own code.

- ``pdperf serve TOPOLOGY``   stand a topology up and keep it serving (the study's launcher)
- ``pdperf query URL``        one streamed request: TTFT and per-token timing
- ``pdperf validate [PATH]``  check topology and workload files (the repo's, or a user's own)
- ``pdperf plan TOPOLOGY``    show where a topology's engines would go on this cluster
- ``pdperf diagnose``         why a deployment is not ready (Serve, placement groups, replica logs)
- ``pdperf report RUN_DIR``   rebuild a run's report; ``pdperf compare A B`` compares runs
- ``pdperf baseline add-run RUN_DIR|POINT...``  add measured runs to their points' baseline bands;
  ``pdperf baseline show FILE [--runs]``  each point's band of runs and what its gate can detect;
  ``pdperf baseline mde FILE|DIR... [--json OUT]``  the minimum detectable regression per point and
  gated statistic; ``baseline remove-run FILE POINT N``
- ``pdperf cleanup [--dry-run] [--ray-address ADDR]``  remove what a killed run left (pdperf.leaks)

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
from typing import TYPE_CHECKING, Any, Literal

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

        url = args.url.rstrip("/") + "/v1/models"
        with urllib.request.urlopen(url, timeout=30) as resp:
            raw = resp.read()
        try:
            model = json.loads(raw)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PdperfError(f"{url}: not an OpenAI model list ({raw[:80]!r}...): is {args.url} the server's base URL? "
                              "Pass the served model with --model if it has no /v1/models") from None
    rec, text = single_request(args.url.rstrip("/"), model, args.prompt, args.max_tokens, api=args.api)
    if rec.error:
        raise PdperfError(f"{args.url}: request failed: {rec.error}: {rec.error_detail}")
    itl = itl_ms(rec)
    out = {"model": model, "output_tokens": rec.output_tokens, "ttft_ms": round(ttft_ms(rec) or 0, 2),
           "tpot_ms": round(tpot_ms(rec) or 0, 2), "chunks": len(rec.chunk_times_s),
           "itl_ms": [round(x, 2) for x in itl], "text": text}
    print(json.dumps(out, indent=1))
    return 0


#: keys a workload file has and a topology file does not (a topology file is told by its ``kind``)
_WORKLOAD_KEYS = ("isl", "osl", "sweep")


def cmd_validate(args: argparse.Namespace) -> int:
    """Without paths: the repo's topologies/ and workloads/. With paths (files, or folders of *.yaml:
    a user's own, from anywhere): each file checked as what its content says it is, with the messages
    the suite gives when it loads it; one line per file, exit status 2 when any is not valid."""
    if not args.paths:
        topos, wls = all_topologies(), all_workloads()
        print(f"{len(topos)} topologies and {len(wls)} workloads are valid")
        return 0
    lines = [problem or _check_spec_file(path) for path, problem in _spec_files(args.paths)]
    for _, line in lines:
        print(line)
    bad = sum(1 for ok, _ in lines if not ok)
    if bad:
        print(f"error: {bad} of {len(lines)} checked are not valid (above)", file=sys.stderr)
        return 2
    return 0


def _spec_files(items: list[str]) -> list[tuple[Path, tuple[bool, str] | None]]:
    """The files the arguments name (a folder: its *.yaml, as the suite reads it), each with the
    problem that stops it from being checked at all, if any."""
    out: list[tuple[Path, tuple[bool, str] | None]] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            out.append((path, (False, f"{path}: no such file or folder; pass topology or workload YAML files, "
                                      "or folders of them")))
        elif path.is_dir():
            files = sorted(path.glob("*.yaml"))
            if not files:
                others = sorted(p.name for p in path.glob("*.yml"))
                hint = f" ({', '.join(others[:3])}: rename them to .yaml)" if others else ""
                out.append((path, (False, f"{path}: no *.yaml files in this folder{hint}; the suite reads "
                                          "topology and workload files named *.yaml")))
            out.extend((f, None) for f in files)
        else:
            out.append((path, None))
    return out


def _check_spec_file(path: Path) -> tuple[bool, str]:
    """One file as a topology (it has a ``kind`` key) or a workload (it has isl, osl or sweep): ok,
    or the error the suite would give, on one line."""
    from pdperf.errors import SpecError
    from pdperf.specs import load_topology, load_workload, load_yaml

    try:
        data = load_yaml(path)
        if "kind" in data:
            stray = [k for k in _WORKLOAD_KEYS if k in data]
            if stray and data["kind"] not in ("collocated", "pd"):  # a workload whose sweep kind slipped out
                raise SpecError(f"{path}: has a 'kind' key ({data['kind']!r}), so it is read as a topology, but "
                                f"also a workload's {', '.join(stray)}; if it is a workload, move 'kind' under "
                                "'sweep:'")
            t = load_topology(path)
            return True, f"{path}: ok, topology '{t.name}'"
        if any(k in data for k in _WORKLOAD_KEYS):
            w = load_workload(path)
            return True, f"{path}: ok, workload '{w.name}'"
        raise SpecError(f"{path}: neither a topology (no 'kind' key) nor a workload (none of "
                        f"{', '.join(_WORKLOAD_KEYS)}); a topology file has kind: collocated or pd, a workload "
                        "file has isl, osl and sweep")
    except SpecError as e:
        first, *problems = str(e).splitlines()  # a validation error lists one problem a line
        return False, first + (": " + "; ".join(p.strip() for p in problems) if problems else "")


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


def cmd_cleanup(args: argparse.Namespace) -> int:
    """What a killed pytest left: its orphaned engine, ``vllm serve``, Ray worker and pdperf processes on
    this machine, and with --ray-address the Serve applications of the suite's topologies on that cluster."""
    from pdperf import leaks

    topologies_dir = Path(args.topologies_dir) if args.topologies_dir else TOPOLOGY_DIR
    if not topologies_dir.is_dir():
        raise PdperfError(f"--topologies-dir {topologies_dir}: no such folder; pass the folder of topology YAML "
                          "files the run used (default: topologies/)")
    apps: tuple[str, ...] = ()
    verb = "would remove" if args.dry_run else "removed"
    if args.ray_address:
        from pdperf.backends.ray_serve import _check_gcs_reachable

        try:
            _check_gcs_reachable(args.ray_address)
        except ConnectionError as e:
            raise PdperfError(f"--ray-address {args.ray_address}: {e}; is Ray running (`ray status`)?") from None
        import ray
        from ray import serve

        ray.init(address=args.ray_address, log_to_driver=False, configure_logging=False)
        try:
            try:
                running = serve.status().applications
            except Exception as e:  # noqa: BLE001 - no Serve on the cluster: no application to delete
                print(f"note: no Serve applications listed on {args.ray_address} ({type(e).__name__}: {e})")
                running = {}
            apps = leaks.suite_apps(running, all_topologies(topologies_dir))
            if apps and not args.dry_run:
                leaks.delete_serve_apps(apps)
        finally:
            ray.shutdown()
    done = leaks.CleanupPlan(apps, leaks.with_ports(leaks.orphans(leaks.list_processes())))
    failed = [] if args.dry_run else leaks.remove_processes(done.processes)
    failed_pids = {p.pid for p, _ in failed}
    removed = leaks.CleanupPlan(apps, tuple(p for p in done.processes if p.pid not in failed_pids))
    for line in removed.lines(verb):
        print(line)
    for p, why in failed:
        print(f"error: could not remove {p.kind} process {p.describe()}: {why}", file=sys.stderr)
    if done.empty:
        where = f"no Serve application of the suite's topologies on {args.ray_address}, " if args.ray_address else ""
        print(f"nothing left behind: {where}no orphaned engine, vllm serve, Ray worker or pdperf process here")
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pdperf.report import build_report, load_run

    run_dir = Path(args.run_dir)
    point_files = sorted((run_dir / "points").glob("*.json")) if run_dir.is_dir() else []
    if run_dir.is_dir() and not point_files and not (run_dir / "verdicts.json").exists():
        # nothing to report: write nothing into a folder that is not a run's
        raise PdperfError(f"{run_dir}: no points/*.json and no verdicts.json: not a pdperf run folder; pass "
                          "reports/<run-id> (or the --run-dir a run wrote)")
    if point_files and not load_run(run_dir).points:
        problems = "; ".join(load_run(run_dir).problems[:3])
        raise PdperfError(f"{run_dir}: none of its {len(point_files)} point files loads ({problems}); no report written")
    print(build_report(run_dir))
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
    thresholds = None if args.no_mde else _load_thresholds(args.thresholds)
    print(_bands_text([Path(f) for f in args.files], runs=args.runs, thresholds=thresholds))
    return 0


def _load_thresholds(path: str | None):
    from pdperf.gate.thresholds import THRESHOLDS_PATH, load_thresholds

    return load_thresholds(Path(path) if path else THRESHOLDS_PATH)


def _baseline_files(items: list[str]) -> list[Path]:
    """Baseline files named, or under the folders named (a store, a hardware's or a topology's folder;
    planner profiles left out)."""
    files: list[Path] = []
    for item in items:
        p = Path(item)
        files.extend(sorted(f for f in p.rglob("*.json") if "profiles" not in f.relative_to(p).parts)
                     if p.is_dir() else [p])
    if not files:
        raise PdperfError(f"{', '.join(items)}: no baseline files (<hardware_id>/<topology>/<workload>.json)")
    return files


def cmd_baseline_mde(args: argparse.Namespace) -> int:
    """What each committed point's gate can detect: the MDE table (pdperf.gate.mde)."""
    from pdperf.gate.mde import POWER, mde_warnings, point_mdes
    from pdperf.gate.store import load_baseline_file

    thresholds = _load_thresholds(args.thresholds)
    if args.draws < 20:
        raise PdperfError(f"--draws {args.draws}: too few to estimate a {POWER:.0%} detection rate; use 100 or more")
    out_files: list[dict[str, Any]] = []
    lines = [f"MDE: the smallest slowdown of each gated statistic that the gate flags as regressed in {POWER:.0%} of "
             f"{args.draws} simulated runs (seed {args.seed}); false alarm: runs of unchanged code flagged. "
             "Method: docs/METHODOLOGY.md, 'What the gate can detect (MDE)'."]
    for f in _baseline_files(args.paths):
        b = load_baseline_file(f)
        resolved = thresholds.resolve(b.hardware_id)
        if b.retired:
            lines.append(f"{f}  ({b.hardware_id}): retired ({b.retired}); never gated, skipped")
            out_files.append({"file": str(f), "hardware_id": b.hardware_id, "retired": b.retired, "points": []})
            continue
        lines.append(f"{f}  ({b.hardware_id}; thresholds: {resolved.source})")
        lines.append(f"  {'point':<6} {'gate':<18} {'limit':>6} {'MDE':>6} {'false alarm':>11} {'requests':>8} "
                     f"{'band':>4}  why")
        points = []
        for pid, entry in sorted(b.points.items(), key=lambda kv: (kv[1].point_value, kv[0])):
            mdes = point_mdes(entry, resolved, requests=args.requests, draws=args.draws, seed=args.seed)
            for m in mdes:
                fa = "-" if m.false_alarm is None else f"{m.false_alarm * 100:.1f}%"
                lines.append(f"  {pid:<6} {m.key:<18} {'+' + format(m.limit * 100, '.0f') + '%':>6} {m.text():>6} "
                             f"{fa:>11} {m.requests:>8} {m.band_runs:>4}  {m.why}")
            warnings = mde_warnings(mdes, sweep_kind=entry.sweep_kind)
            lines.extend(f"  ! {pid}: {w}" for w in warnings)
            points.append({"point": pid, "sweep_kind": entry.sweep_kind, "point_value": entry.point_value,
                           "mdes": [m.to_dict() for m in mdes], "warnings": warnings})
        out_files.append({"file": str(f), "hardware_id": b.hardware_id, "thresholds": resolved.source,
                          "retired": None, "points": points})
    print("\n".join(lines))
    if args.json:
        from pdperf.results import atomic_write_json

        atomic_write_json(Path(args.json), {"power": POWER, "draws": args.draws, "seed": args.seed,
                                            "requests": args.requests, "files": out_files})
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
        b = load_baseline_file(f)  # validates (schema 1 through the migration); raises naming the file
        before = json.loads(f.read_text()).get("schema_version")  # readable JSON: it loaded
        if before != b.data.schema_version:
            write_baseline_file(f, b.data)
        print(f"{f}: schema {before} -> {b.data.schema_version}" if before != b.data.schema_version
              else f"{f}: schema {before}, unchanged")
    return 0


def _run_text(run: BandRun) -> str:
    vals = ", ".join(f"p50 {m} {v:.3g}" for m in ("ttft_ms", "tpot_ms") if (v := run.stat(m, "p50")) is not None)
    return f"{run.started_at or '?'}, git {(run.git_sha or '?')[:12]}: {vals}"


def _bands_text(files: list[Path], point_ids: set[str] | None = None, *, runs: bool = False,
                thresholds=None) -> str:
    """Per baseline file and point: each run's p50 TTFT and TPOT and the band's spread (worst / best);
    with ``runs``, a line per run (numbered as ``baseline remove-run`` takes them); with
    ``thresholds``, what the point's gate can detect (the MDE of each gated statistic) and a warning
    when it cannot catch a 10 % regression of TPOT p50 or of throughput."""
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
            if thresholds is not None and not b.retired:
                lines.extend(_mde_lines(entry, thresholds))
    return "\n".join(lines)


def _mde_lines(entry, thresholds) -> list[str]:
    """``    MDE (95%, 128 requests): p50 ttft_ms +34% spread-bound, ...`` and the point's warnings."""
    from pdperf.gate.mde import POWER, mde_warnings, point_mdes

    mdes = point_mdes(entry, thresholds)
    if not mdes:
        return []
    cells = ", ".join(f"{m.key} {m.text()} {m.why.split(':')[0]}" for m in mdes)
    requests = max(m.requests for m in mdes)
    lines = [f"    MDE ({POWER:.0%} detection, {requests} requests a run): {cells}"]
    lines.extend(f"    ! {w}" for w in mde_warnings(mdes, sweep_kind=entry.sweep_kind))
    return lines


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
    v = sub.add_parser("validate", help="validate topology and workload files (default: the repo's)")
    v.add_argument("paths", nargs="*", metavar="PATH",
                   help="topology or workload YAML files, or folders of them (default: topologies/ and workloads/)")
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
    c = sub.add_parser("cleanup", help="remove what a killed run left: orphaned engine processes here, and with "
                                       "--ray-address the suite's Serve applications on that cluster")
    c.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    c.add_argument("--ray-address", default=None, help="a kept cluster: delete the Serve applications named after "
                                                       "the suite's topologies there")
    c.add_argument("--topologies-dir", default=None, metavar="DIR", help="the run's topology files (default: "
                                                                         "topologies/): their names are the apps")
    c.set_defaults(fn=cmd_cleanup)
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
    bs = bsub.add_parser("show", help="each point's runs, their spread, and what its gate can detect (MDE)")
    bs.add_argument("files", nargs="+", metavar="BASELINE_JSON")
    bs.add_argument("--runs", action="store_true", help="a line per run, numbered as remove-run takes them")
    bs.add_argument("--no-mde", action="store_true", help="leave out the minimum detectable regressions")
    bs.add_argument("--thresholds", default=None, metavar="YAML", help="gate thresholds "
                    "(default baselines/thresholds.yaml)")
    bs.set_defaults(fn=cmd_baseline_show)
    bd = bsub.add_parser("mde", help="the minimum detectable regression of each point's gated statistics "
                                     "(a power analysis of the gate by simulation)")
    bd.add_argument("paths", nargs="+", metavar="BASELINE_JSON|BASELINES_DIR")
    bd.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON")
    bd.add_argument("--requests", type=int, default=None, metavar="N",
                    help="requests a new run of each point sends (default: the baseline's own)")
    bd.add_argument("--draws", type=int, default=300, metavar="N", help="simulated runs per statistic (default 300)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--thresholds", default=None, metavar="YAML", help="gate thresholds "
                    "(default baselines/thresholds.yaml)")
    bd.set_defaults(fn=cmd_baseline_mde)
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
        print(f"error: {_os_error_line(e, args)}", file=sys.stderr)
        return 2


def _os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """An OSError a command let through, as one line that names the thing and the fix."""
    import urllib.error

    url = getattr(args, "url", None)
    if isinstance(e, urllib.error.URLError) and url:  # pdperf query's look-up of the served model
        return f"{url}: cannot connect ({e.reason}); check the URL and that the server is up"
    command = " ".join(str(x) for x in ("pdperf", args.cmd, getattr(args, "action", None)) if x)
    if isinstance(e, IsADirectoryError):
        return f"{e.filename}: a folder, where a file is expected; pass a file (`{command} -h`)"
    if isinstance(e, NotADirectoryError):
        return f"{e.filename}: not a folder, where a folder is expected (`{command} -h`)"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
