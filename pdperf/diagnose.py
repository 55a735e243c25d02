"""``pdperf diagnose``: one text file that says why a deployment is not ready (or what it did).

A start-up that hangs without an error is the costliest failure on a GPU cluster: the Serve
status says DEPLOYING and nothing else. This gathers, from a running Ray cluster, what
answers "where does it stand": Serve applications and their deployments' replica states,
placement groups that are not placed (with their bundles), replica actors (state, pid,
restarts), the newest lines of each engine replica's log and of the Serve controller, the
first error block of every worker log that has one (where an engine's root cause sits, above
the repeated "EngineCore encountered an issue" lines a tail shows), vLLM engine processes with
their CPU time (compiling or stuck?), and ``nvidia-smi``.

``collect`` takes the snapshot (each part fails on its own, into the text); ``render`` turns
a snapshot into text and is tested on fake snapshots.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pdperf.backends.base import nonblank_tail, ray_worker_log

DEFAULT_LOGS = Path("/tmp/ray/session_latest/logs")


def replica_logs(logs_dir: Path, actors: list[dict[str, Any]], n: int) -> dict[str, list[str]]:
    """Newest lines of each engine actor's stderr (``worker-*-<pid>.err``) in ``logs_dir`` (Serve
    replicas other than ingress and router, and vLLM's Ray worker actors)."""
    out: dict[str, list[str]] = {}
    for a in actors:
        name, pid = a.get("ActorClassName") or "?", a.get("Pid")
        if not pid or "Ingress" in name or "Router" in name:
            continue
        log_file = ray_worker_log(logs_dir, pid)
        if log_file is not None:
            out[f"{name} (pid {pid}, {a.get('State')})"] = nonblank_tail(log_file, n)
    return out


FIRST_ERROR = re.compile(r"Traceback \(most recent call last\)|\bERROR\b.*\b(failed|Error|Exception)\b|"
                         r"^\S*(Error|Exception): ")


def first_errors(logs_dir: Path, n: int = 40, max_files: int = 4) -> dict[str, list[str]]:
    """The first error block (``n`` lines from the first traceback or ERROR line) of each worker log
    (``worker-*.err``) that has one, newest files first: a dead engine's root cause is printed once,
    then every request and health check repeats "EngineCore encountered an issue"."""
    out: dict[str, list[str]] = {}
    files = sorted(Path(logs_dir).glob("worker-*.err"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        if len(out) >= max_files:
            break
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        start = next((i for i, ln in enumerate(lines) if FIRST_ERROR.search(ln)), None)
        if start is not None:
            out[path.name] = [ln for ln in lines[start:start + n] if ln.strip()]
    return out


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one failed part must not hide the others
        return {"error": f"{type(e).__name__}: {e}"}


def _serve_status() -> dict[str, Any]:
    from ray import serve

    apps = {}
    for name, st in serve.status().applications.items():
        apps[name] = {"status": st.status.value, "message": st.message,
                      "deployments": {d: {"status": x.status.value, "replicas": dict(x.replica_states),
                                          "message": x.message} for d, x in st.deployments.items()}}
    return apps


def _resources() -> dict[str, Any]:
    import ray

    keep = lambda r: {k: v for k, v in r.items() if not k.startswith(("bundle_group", "CPU_group", "GPU_group",  # noqa: E731
                                                                      "memory", "object_store"))}
    return {"total": keep(ray.cluster_resources()), "available": keep(ray.available_resources())}


def _engine_processes() -> list[str]:
    import psutil

    from pdperf.loadgen.hostcpu import SERVING_PREFIXES

    rows = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
        cmd = p.info.get("cmdline") or []
        name = p.info.get("name") or ""
        label = cmd[0] if cmd and cmd[0].startswith(SERVING_PREFIXES) else name
        if label.startswith(SERVING_PREFIXES):
            t = p.info.get("cpu_times")
            rows.append(f"pid {p.info['pid']} {label[:90]} cpu {t.user + t.system if t else 0:.0f} s")
    return rows


def _nvidia_smi() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total,utilization.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"(nvidia-smi: {e})"]
    return out.stdout.splitlines() or [out.stderr.strip() or "(no output)"]


def collect(logs_dir: Path | None = None, n: int = 40) -> dict[str, Any]:
    """Snapshot of the Ray cluster this process is connected to (``ray.init`` done by the caller)."""
    from pdperf import compat

    logs = Path(logs_dir or compat.local_logs_dir() or DEFAULT_LOGS)
    actors = _try(compat.actor_table)
    serve_actors = [a for a in actors if (a.get("ActorClassName") or "").startswith("ServeReplica:")] \
        if isinstance(actors, list) else []
    # vLLM's GPU workers under the Ray executor are actors of their own (RayWorkerProc /
    # RayWorkerWrapper): compile, CUDA graph capture and NCCL set-up log there, not in the replica.
    engine_workers = [a for a in actors if "RayWorker" in (a.get("ActorClassName") or "")
                      and a.get("State") != "DEAD"] if isinstance(actors, list) else []
    pgs = _try(compat.placement_groups)
    controller = sorted(glob.glob(str(logs / "serve" / "controller_*.log")), key=os.path.getmtime)
    return {
        "resources": _try(_resources),
        "serve": _try(_serve_status),
        "placement_groups": pgs if isinstance(pgs, list) else [pgs],
        "replicas": [{"name": a.get("ActorClassName"), "state": a.get("State"), "pid": a.get("Pid"),
                      "restarts": a.get("NumRestarts"), "death": (a.get("DeathCause") or {}) and str(a.get("DeathCause"))[:300]}
                     for a in serve_actors],
        "replica_logs": replica_logs(logs, serve_actors + engine_workers, n),
        "first_errors": _try(first_errors, logs, n),
        "controller_log": nonblank_tail(Path(controller[-1]), n) if controller else [f"(no controller log under {logs})"],
        "engine_processes": _try(_engine_processes),
        "gpus": _nvidia_smi(),
        "logs_dir": str(logs),
    }


def render(snap: dict[str, Any]) -> str:
    out: list[str] = []
    add = out.append
    res = snap.get("resources", {})
    add("== Ray resources (logical; total / available)")
    if "error" in res:
        add(f"  {res['error']}")
    else:
        for k in sorted(res.get("total", {})):
            add(f"  {k}: {res['total'][k]:g} / {res.get('available', {}).get(k, 0):g}")
    add("== Serve applications")
    serve = snap.get("serve", {})
    if "error" in serve:
        add(f"  {serve['error']}")
    for app, st in (serve.items() if "error" not in serve else []):
        add(f"  {app}: {st['status']}" + (f" ({st['message'][:500]})" if st.get("message") else ""))
        for d, x in st.get("deployments", {}).items():
            add(f"    {d}: {x['status']} replicas {x['replicas']}" + (f" {x['message'][:500]}" if x.get("message") else ""))
    add("== Placement groups not placed")
    pending = [p for p in snap.get("placement_groups", []) if isinstance(p, dict) and p.get("state") not in
               ("CREATED", "REMOVED")]
    for p in pending:
        add(f"  {p.get('name') or p.get('error')}: {p.get('state')} bundles {list((p.get('bundles') or {}).values())} "
            f"{p.get('strategy', '')}")
    if not pending:
        add("  (none)")
    add("== Serve replica actors")
    for r in snap.get("replicas", []) or [{"name": "(none)"}]:
        add(f"  {r.get('name')}: {r.get('state', '')} pid {r.get('pid')} restarts {r.get('restarts')}"
            + (f" death: {r['death']}" if r.get("death") else ""))
    add("== Engine processes (CPU seconds so far: rising = working, flat = waiting)")
    procs = snap.get("engine_processes", [])
    for row in (procs if isinstance(procs, list) else [procs.get("error")]) or ["(none)"]:
        add(f"  {row}")
    add("== GPUs (index, memory used, total, utilization)")
    for row in snap.get("gpus", []):
        add(f"  {row}")
    for name, lines in snap.get("replica_logs", {}).items():
        add(f"== last lines of {name}")
        out.extend(f"  {ln}" for ln in lines)
    errors = snap.get("first_errors") or {}
    for name, lines in (errors.items() if "error" not in errors else [("(worker logs)", [errors["error"]])]):
        add(f"== first error block of {name}")
        out.extend(f"  {ln}" for ln in lines)
    add(f"== Serve controller log (newest lines; logs in {snap.get('logs_dir')})")
    out.extend(f"  {ln}" for ln in snap.get("controller_log", []))
    return "\n".join(out) + "\n"


def main(address: str, n: int = 40) -> str:
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level=logging.ERROR)
    try:
        return render(collect(n=n))
    finally:
        ray.shutdown()
