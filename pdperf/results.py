"""Result schema: per-request records, per-point results, atomic JSON files.

A point's result keeps every request's raw timings (not only percentiles), the environment
it ran in and the server's telemetry, so that a later comparison can test significance on
samples and refuse to compare across different hardware. Files carry ``schema_version``
and are written atomically (temp file + rename): a crash never leaves half a result.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@dataclass
class RequestRecord:
    """One request's life, in seconds on the load generator's monotonic clock.

    ``scheduled_s`` is when the load model wanted the request sent; latency clocks start
    there, so client-side queueing (``sent_s - scheduled_s``) is visible, not hidden.
    ``chunk_times_s`` are arrival times of content-bearing stream chunks and
    ``chunk_tokens`` the tokens each carried (several per chunk is normal).
    """

    index: int
    scheduled_s: float
    sent_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # kind: http_4xx, http_5xx, timeout, connection, stream, empty
    error_detail: str | None = None
    warmup: bool = False
    worker: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token_s is not None and self.end_s is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**d)


@dataclass
class PointResult:
    """One load point of one topology under one workload."""

    topology: str
    workload: str
    point_id: str
    sweep_kind: str  # concurrency | rate | single
    point_value: float
    gpus: int
    started_at: str
    duration_s: float
    records: list[RequestRecord]
    summary: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # e.g. "replica_restart_during_load"
    client: dict[str, Any] = field(default_factory=dict)  # client CPU seconds etc.
    schema_version: int = SCHEMA_VERSION

    @property
    def id(self) -> str:
        return f"{self.topology}/{self.workload}/{self.point_id}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PointResult":
        d = dict(d)
        d.pop("id", None)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"result schema_version {version} is not {SCHEMA_VERSION}; "
                             "re-run the point or convert the file")
        d["records"] = [RequestRecord.from_dict(r) for r in d["records"]]
        return cls(**d)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def save_point(path: Path, result: PointResult) -> None:
    atomic_write_json(path, result.to_dict())


def load_point(path: Path) -> PointResult:
    return PointResult.from_dict(json.loads(Path(path).read_text()))
