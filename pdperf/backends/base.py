"""What every backend hands the tests: an Endpoint, whatever stands behind it.

A backend turns a Topology into something serving the OpenAI API. Tests and the load
generator only see the Endpoint: a base URL, the model id, the tokenizer to build prompts
with, the engines' Prometheus URLs, how long start-up took, and a way to count replica
restarts (a restart during a load point makes that point's numbers suspect).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdperf.placement import PlacementPlan
from pdperf.specs import Topology


@dataclass
class Endpoint:
    topology: Topology
    backend: str
    base_url: str
    model_id: str  # the name requests carry (Ray and vLLM serve the topology's name; an external server its own)
    tokenizer_path: Path
    # What the engines serve: a models.py key or a model folder (--model). Recorded with every point:
    # a band never mixes two models, and a gate notes a different one. "" = unknown.
    model: str = ""
    metrics_urls: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    placement: PlacementPlan | None = None
    restarts_at_ready: int = 0
    restart_counter: Callable[[], int] = lambda: 0
    log_tail: Callable[[int], str] = lambda n: ""
    # The engines' own output (stdout and stderr), newest ``n`` lines each: what UCX printed about
    # the transport it chose for the KV (pdperf.network.parse_proto_info). "" when not available.
    engine_output: Callable[[int], str] = lambda n: ""
    details: dict = field(default_factory=dict)
    # Other applications the backend sees serving on the same cluster (e.g. Serve apps another
    # pytest run kept up); the pool's own deployments are added by the caller.
    neighbours: Callable[[], list[str]] = lambda: []

    @property
    def name(self) -> str:
        return self.topology.name

    def restarts(self) -> int:
        """Replica restarts seen since this endpoint was created (start-up included)."""
        return self.restart_counter()


class Deployment:
    """A backend's deployment of one topology.

    ``launch()`` starts it without waiting (so several can start side by side), ``wait_ready()``
    returns the Endpoint once it serves, ``start()`` does both; ``stop()`` leaves nothing behind.
    """

    backend = "base"

    def launch(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def wait_ready(self, timeout_s: float) -> Endpoint:  # pragma: no cover - interface
        raise NotImplementedError

    def start(self, timeout_s: float) -> Endpoint:
        self.launch()
        return self.wait_ready(timeout_s)

    def stop(self, *, evict: bool = False) -> None:  # pragma: no cover - interface
        """Tear down. ``evict``: the pool needs the resources for another topology, so even a deployment
        that ``--keep-deployments`` would leave running at the end of the session goes."""
        raise NotImplementedError


def tail_file(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(deque(f, maxlen=n)).decode(errors="replace")
    except OSError as e:
        return f"(could not read {path}: {e})"


def nonblank_tail(path: Path, n: int) -> list[str]:
    """The last ``n`` non-blank lines of a log file (or one line saying why it could not be read)."""
    return [ln for ln in tail_file(path, 2 * n + 8).splitlines() if ln.strip()][-n:]


def ray_worker_log(logs_dir: Path, pid: int, suffix: str = "err") -> Path | None:
    """The newest stderr (``suffix="out"``: stdout) file of a Ray worker process (``worker-*-<pid>.err``)
    in a node's log folder."""
    files = sorted(Path(logs_dir).glob(f"worker-*-{pid}.{suffix}"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def kill_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL: engines spawn children of their own."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            # the leader is gone; children of the group may linger a moment
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
