"""Measured points from a run folder's ``results.csv``: for archived runs whose ``points/*.json`` are gone.

Why: the archived GPU runs (benchmarks/results/gpu-runs/) kept ``run.json`` and ``results.csv``
but not the per-request point files, which :func:`pdperf.planner.profiles.load_run_points`
reads. ``results.csv`` still holds every number the planner compares (TTFT p50 / p99, TPOT
p50 / p99, output tokens/s, successful requests), so a profile can be fitted to, and a
prediction checked against, those runs.

What the CSV does not say is taken from the specs, and is therefore an assumption:

- ISL and OSL come from ``workloads/<workload>.yaml`` (the suite's prompts are token-exact and
  its outputs run to OSL; a point file's records would show the actual counts);
- the closed-loop protocol: a workload with warm-up requests is the steady state
  (``requests_per_slot=None``), as :func:`pdperf.planner.predict.measured_point` decides for
  a point whose records include warm-up ones;
- the configuration comes from ``topologies/<topology>.yaml`` (replicas, TP, placement);
- the model from run.json (its environment, else the ``--model`` of its command).

NIXL's KV bandwidth is not in ``results.csv``: PD points loaded here carry none.
"""

from __future__ import annotations

import csv
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from pdperf.errors import SpecError
from pdperf.planner.model import Deployment, WorkloadPoint
from pdperf.planner.profiles import MeasuredPoint, PlannerError
from pdperf.specs import TOPOLOGY_DIR, WORKLOAD_DIR, Topology, Workload, load_topology, load_workload

#: results.csv columns this loader reads.
NEEDED_COLUMNS = ("id", "topology", "workload", "sweep_kind", "point_value", "metric", "p50", "p99", "value")


def run_identity(run_dir: Path) -> tuple[str, str]:
    """(hardware_id, model) of a run folder, from its run.json (the model: environment, else ``--model``)."""
    path = Path(run_dir) / "run.json"
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlannerError(f"{path}: missing; the run's hardware and model are unknown (pass them explicitly)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlannerError(f"{path}: not JSON ({e}); pass the run's hardware and model explicitly") from None
    env = run.get("environment") if isinstance(run, dict) else None
    env = env if isinstance(env, dict) else {}
    hardware = str(env.get("hardware_id") or "")
    model = str(env.get("model") or "")
    if not model:
        try:
            words = shlex.split(str(run.get("command") or ""))
        except ValueError:
            words = []
        for i, w in enumerate(words):
            if w == "--model" and i + 1 < len(words):
                model = words[i + 1]
            elif w.startswith("--model="):
                model = w.split("=", 1)[1]
    if not hardware or not model:
        raise PlannerError(f"{path}: no {'hardware_id' if not hardware else 'model'} in its environment or command; "
                           "pass it explicitly")
    return hardware, model


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def load_results_csv(run_dir: Path, *, workloads: Sequence[str] | None = None, topology_dir: Path | None = None,
                     workload_dir: Path | None = None) -> list[MeasuredPoint]:
    """The points of ``run_dir/results.csv`` (only those of ``workloads`` when given), in file order.

    A point without a TTFT p50, a TPOT p50 or an output throughput (no successful request) is
    left out; CPU topologies are refused as :func:`~pdperf.planner.profiles.load_run_points` does.
    """
    path = Path(run_dir) / "results.csv"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlannerError(f"{path}: missing; pass a run folder with results.csv (or its points/*.json to "
                           "`pdperf planner calibrate --runs`)") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in NEEDED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PlannerError(f"{path}: missing column(s) {', '.join(missing)}; pass a results.csv written by pdperf")
    tdir = Path(topology_dir) if topology_dir else TOPOLOGY_DIR
    wdir = Path(workload_dir) if workload_dir else WORKLOAD_DIR
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for row in reader:
        if workloads is not None and row["workload"] not in workloads:
            continue
        rows.setdefault(row["id"], {})[row["metric"]] = row
    topologies: dict[str, Topology] = {}
    specs: dict[str, Workload] = {}
    out: list[MeasuredPoint] = []
    for pid, by_metric in rows.items():
        first = next(iter(by_metric.values()))
        topo_name, wl_name = first["topology"], first["workload"]
        try:
            topo = topologies.get(topo_name) or load_topology(tdir / f"{topo_name}.yaml")
            wl = specs.get(wl_name) or load_workload(wdir / f"{wl_name}.yaml")
        except SpecError as e:
            raise PlannerError(f"{path}: point {pid}: {e}; the planner needs its topology and workload specs") \
                from None
        topologies[topo_name], specs[wl_name] = topo, wl
        if topo.device != "gpu":
            raise PlannerError(f"{path}: topology '{topo_name}' is a CPU topology; profiles are fitted to GPU runs")

        def stat(metric: str, column: str, by_metric: dict[str, dict[str, str]] = by_metric) -> float | None:
            r = by_metric.get(metric)
            return _float(r.get(column)) if r else None

        med_ttft, med_tpot = stat("ttft_ms", "p50"), stat("tpot_ms", "p50")
        tok_s = stat("output_tok_per_s", "value")
        if med_ttft is None or med_tpot is None or not tok_s:
            continue
        ok = stat("requests_ok", "value")
        value = float(first["point_value"])
        if first["sweep_kind"] == "rate":
            wp = WorkloadPoint(wl.isl, wl.osl, "rate", value)
        else:
            rps = None if wl.sweep.warmup_requests else (max(int(round(ok / max(value, 1))), 1) if ok else None)
            wp = WorkloadPoint(wl.isl, wl.osl, "concurrency", value, rps)
        out.append(MeasuredPoint(config=topo_name, deployment=Deployment.from_topology(topo), point=wp,
                                 med_ttft_ms=med_ttft, med_tpot_ms=med_tpot, out_tok_s=tok_s,
                                 p99_ttft_ms=stat("ttft_ms", "p99"), p99_tpot_ms=stat("tpot_ms", "p99"),
                                 requests=int(ok) if ok else None, source=f"{path}:{pid}"))
    return out
