"""Plain ``vllm serve`` processes: the no-Ray reference that shows what Ray itself costs.

Each engine of the topology is one ``vllm serve`` process on a free port (on GPU machines its
GPUs through CUDA_VISIBLE_DEVICES, never ones another live deployment of the session holds: the
session's ``GpuLedger``, handed in); its arguments and environment come from ``pdperf.engine``,
as the ray backend's do, so the two differ only in what stands around the engines. PD and
multi-replica topologies get the small proxy in ``pd_proxy``. Single-node only: a multi-node
topology is skipped with the reason. Every process is started in its own process group and
killed as a group (it inherits this process's environment, plus the engine's). Readiness races
every engine's ``/health`` against its process exiting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pdperf.backends.base import Deployment, Endpoint, kill_process_group, nonblank_tail, tail_file
from pdperf.engine import vllm_serve_args, vllm_serve_env
from pdperf.errors import ClusterError, DeployError
from pdperf.models import DEFAULT_CACHE, ensure_model
from pdperf.specs import Topology
from pdperf.waiting import WaitTimeout, free_port, poll_until

PROGRESS = logging.getLogger("pdperf.progress")  # shown on the terminal during long waits (fixtures/session.py)


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path


def vllm_cli() -> list[str]:
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def visible_gpus(cuda_visible_devices: str | None) -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES entries: ``cuda_visible_devices`` (the process's own
    CUDA_VISIBLE_DEVICES, read by the caller) when set, else 0..n-1 from nvidia-smi."""
    if cuda_visible_devices is not None:
        return [x.strip() for x in cuda_visible_devices.split(",") if x.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i in range(sum(1 for ln in out.stdout.splitlines() if ln.startswith("GPU ")))]


class GpuLedger:
    """Which GPUs this session's live ``vllm serve`` deployments hold, so that two deployments up at once
    (a PD topology and its collocated reference) never share a GPU. Seen on 4x H100 before it existed:
    both started from GPU 0 and the second engine failed with "Free memory on device cuda:0 … is less
    than desired GPU memory utilization".

    One ledger per session (``pdperf.session.runtime.SessionRuntime`` owns it), handed to every
    deployment: ``devices`` lists the GPUs to hand out, or None to ask ``visible_gpus`` (with the
    process's ``cuda_visible_devices``) the first time they are needed."""

    def __init__(self, devices: list[str] | None = None, *, cuda_visible_devices: str | None = None):
        self._devices = devices
        self._cuda_visible_devices = cuda_visible_devices
        self._held: dict[str, str] = {}  # device -> topology

    def devices(self) -> list[str]:
        if self._devices is None:
            self._devices = visible_gpus(self._cuda_visible_devices)
        return self._devices

    def take(self, owner: str, n: int) -> list[str]:
        free = [d for d in self.devices() if d not in self._held]
        if len(free) < n:
            holders = sorted(set(self._held.values()))
            raise ClusterError(f"topology {owner}: needs {n} GPUs, {len(free)} of {len(self.devices())} free"
                               f"{' (held by ' + ', '.join(holders) + ')' if holders else ''}; deploy fewer "
                               "topologies at once (--max-alive 1) or use a machine with more GPUs")
        for d in free[:n]:
            self._held[d] = owner
        return free[:n]

    def release(self, owner: str) -> None:
        self._held = {d: o for d, o in self._held.items() if o != owner}


class VllmProcessDeployment(Deployment):
    backend = "vllm"

    def __init__(self, topology: Topology, log_dir: Path, *, ledger: GpuLedger, model: str | None = None,
                 model_cache: Path = DEFAULT_CACHE):
        self.topology = topology
        self.model = model or topology.model
        self.model_cache = model_cache
        self.log_dir = Path(log_dir)
        self.ledger = ledger
        self.procs: list[_Proc] = []
        self._ledger_owner: str | None = None

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], url: str) -> _Proc:
        """Start ``cmd`` in a process group of its own; ``env`` is what it adds to this process's environment."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.topology.name}-{name}.log"
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    start_new_session=True, stdin=subprocess.DEVNULL)
        p = _Proc(name, proc, url, log_path)
        self.procs.append(p)
        return p

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) last lines:\n{tail_file(p.log_path, n)}" for p in self.procs)

    def _last_lines(self) -> str:
        """Each engine's newest log line: where its start-up stands (loading, compiling, capturing graphs)."""
        parts = []
        for p in self.procs:
            lines = nonblank_tail(p.log_path, 1)
            parts.append(f"{p.name}: {lines[-1].strip()[-200:] if lines else '(no output yet)'}")
        return "; ".join(parts)

    def launch(self) -> None:
        t = self.topology
        if t.nodes_needed > 1:
            raise ClusterError(f"topology {t.name}: the vllm backend runs on one node; 'spread' needs the ray backend")
        gpus_here = len(self.ledger.devices()) if t.device == "gpu" else 0
        if t.device == "gpu" and gpus_here < t.gpus:
            raise ClusterError(f"topology {t.name}: needs {t.gpus} GPUs, this node has {gpus_here}")
        model_path = ensure_model(self.model, cache=self.model_cache)
        mine = self.ledger.take(t.name, t.gpus) if t.device == "gpu" else []
        self._ledger_owner = t.name
        t0 = time.monotonic()
        engines: dict[str, list[_Proc]] = {}
        for role, r in t.roles().items():
            for i in range(r.replicas):
                port = free_port()
                devices = None
                if t.device == "gpu" and t.shares_gpu:  # engines sharing one GPU: all on the one taken
                    devices = mine[:1]
                elif t.device == "gpu":
                    devices, mine = mine[:r.tp], mine[r.tp:]
                env = vllm_serve_env(t, side_channel_port=free_port(), devices=devices)
                cmd = vllm_cli() + vllm_serve_args(t, role, model_path, port)
                engines.setdefault(role, []).append(self._spawn(f"{role}{i}", cmd, env, f"http://127.0.0.1:{port}"))
        front: _Proc | None = None
        all_engines = [p for ps in engines.values() for p in ps]
        if t.kind == "pd" or len(all_engines) > 1:
            port = free_port()
            decode = engines.get("decode") or engines["collocated"]
            cmd = [sys.executable, "-m", "pdperf.backends.pd_proxy", "--port", str(port),
                   "--decode", ",".join(p.url for p in decode),
                   "--prefill", ",".join(p.url for p in engines.get("prefill", []))]
            front = self._spawn("proxy", cmd, {}, f"http://127.0.0.1:{port}")
        self._t0, self._model_path, self._front, self._engines = t0, model_path, front, all_engines

    def wait_ready(self, timeout_s: float = 900.0) -> Endpoint:
        t = self.topology
        t0, model_path, front, all_engines = self._t0, self._model_path, self._front, self._engines

        def all_healthy() -> bool | None:
            for p in self.procs:
                if p.proc.poll() is not None:
                    raise DeployError(f"topology {t.name}: process {p.name} exited with code {p.proc.returncode} "
                                      f"during start-up\n{self.log_tail()}")
            for p in self.procs:
                try:
                    with urllib.request.urlopen(p.url + "/health", timeout=5) as resp:
                        if resp.status != 200:
                            return None
                except (urllib.error.URLError, OSError):
                    return None
            return True

        try:
            poll_until(all_healthy, what=f"/health of {', '.join(p.name for p in self.procs)}", timeout_s=timeout_s,
                       interval_s=1.0, describe=self._last_lines,
                       progress=lambda line: PROGRESS.info("topology %s: %s", t.name, line))
        except WaitTimeout as e:
            raise DeployError(f"topology {t.name}: {e}\n{self.log_tail()}") from None
        PROGRESS.info("topology %s: ready after %.0f s", t.name, time.monotonic() - t0)
        base = (front or all_engines[0]).url
        return Endpoint(topology=t, backend=self.backend, base_url=base, model_id=t.name, tokenizer_path=model_path,
                        model=self.model,
                        metrics_urls=[p.url + "/metrics" for p in all_engines], startup_s=time.monotonic() - t0,
                        restart_counter=lambda: 0, log_tail=self.log_tail, engine_output=self.log_tail,
                        details={"engines": {p.name: p.url for p in all_engines}, "logs": str(self.log_dir)})

    def stop(self, *, evict: bool = False) -> None:
        for p in reversed(self.procs):
            kill_process_group(p.proc)
        self.procs.clear()
        if self._ledger_owner:
            self.ledger.release(self._ledger_owner)
            self._ledger_owner = None


class ExternalDeployment(Deployment):
    """A server someone else runs: the suite only measures it."""

    backend = "external"

    def __init__(self, topology: Topology, url: str, *, tokenizer: str | None = None, model_id: str | None = None,
                 metrics_urls: list[str] | None = None, model_cache: Path = DEFAULT_CACHE):
        self.topology = topology
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.metrics_urls = metrics_urls or []
        self.model_cache = model_cache

    def launch(self) -> None:
        pass

    def wait_ready(self, timeout_s: float = 60.0) -> Endpoint:
        def models() -> list[str] | None:
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as resp:
                    return [m["id"] for m in json.load(resp).get("data", [])]
            except (urllib.error.URLError, OSError, ValueError):
                return None

        try:
            ids = poll_until(models, what=f"{self.url}/v1/models to answer", timeout_s=timeout_s)
        except WaitTimeout as e:
            raise DeployError(f"--external-url {self.url}: {e}; check the URL and that the server is up") from None
        model_id = self.model_id or (ids[0] if ids else None)
        if not model_id or model_id not in ids:
            raise DeployError(f"--external-url {self.url}: serves models {ids}, not '{model_id}'; pass --external-model")
        tokenizer = ensure_model(self.tokenizer or self.topology.model, cache=self.model_cache)
        return Endpoint(topology=self.topology, backend=self.backend, base_url=self.url, model_id=model_id,
                        tokenizer_path=tokenizer, model=model_id, metrics_urls=self.metrics_urls, startup_s=0.0,
                        details={"url": self.url})

    def stop(self, *, evict: bool = False) -> None:
        pass
