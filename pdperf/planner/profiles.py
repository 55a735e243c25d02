"""Role profiles: what a prefill engine and a decode engine of TP ``t`` do, as data.

A profile is a handful of parameters per (hardware fingerprint, model), fitted to measured
sweeps (:mod:`pdperf.planner.fit`) and stored as JSON, so that a prediction can be made,
checked and argued about without re-running the fit:

- prefill: milliseconds per 1000 prompt tokens (+ per request) at the reference TP; a TP ``t``
  engine is ``(t / ref_tp) ** tp_exponent`` times faster (sub-linear: exponent < 1); on a
  collocated engine a prompt costs ``collocated_factor`` times more (mixed steps are less efficient);
- decode: one step costs ``step_ms + batch * (per_seq_ms + per_seq_ms_per_ktoken * context / 1000)``
  at the reference TP, each term with its own TP exponent (weight reads and all-reduces scale
  differently from per-sequence attention);
- the KV cache: how many context tokens one engine can hold (the physical limit from GPU
  memory minus weights, or a lower effective one the data showed) and how much slower its
  steps get once it is full (preemption);
- the KV transfer (PD): bytes per token and bandwidth, from NIXL telemetry where the points
  carry it, else a stated default;
- overheads outside the engines, and how far collocated closed loops move in convoys.

The file also records how the profile was made: which points, which parameters the data
identified and which are assumed (with the reason), the fit quality in-sample and
leave-one-config-out, and a bootstrap of parameter sets that carries the uncertainty.

:func:`resolve` turns a profile and a deployment into :class:`~pdperf.planner.costs.SystemCosts`;
:func:`load_study_csv` and :func:`load_run_points` read the two kinds of calibration data.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdperf.errors import PdperfError
from pdperf.planner.costs import RoleCosts, SystemCosts
from pdperf.planner.model import Deployment, WorkloadPoint
from pdperf.results import atomic_write_text

PROFILE_KIND = "pdperf-planner-profile"
PROFILE_SCHEMA_VERSION = 1


class PlannerError(PdperfError):
    """A planner input that cannot be used; the message names it, the value and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefillParams(_Strict):
    """Prompt processing on one engine at the reference TP."""

    ms_per_ktoken: float = Field(gt=0, description="prefill milliseconds per 1000 prompt tokens")
    ms_per_request: float = Field(0.0, ge=0, description="fixed prefill milliseconds per request")
    tp_exponent: float = Field(0.9, ge=0, le=1.5, description="TP t is (t/ref_tp)**exponent times faster")
    chunk_tokens: int = Field(8192, ge=16, description="tokens per engine step (vLLM max_num_batched_tokens)")
    collocated_factor: float = Field(1.0, ge=0.3, le=5.0, description=(
        "prompt cost on a collocated engine relative to a PD prefill engine (mixed prefill+decode steps)"))


class DecodeParams(_Strict):
    """One decode step of one engine at the reference TP."""

    step_ms: float = Field(gt=0, description="fixed milliseconds per step (weight reads, launch, all-reduce)")
    step_tp_exponent: float = Field(0.3, ge=-0.5, le=1.5)
    per_seq_ms: float = Field(0.0, ge=0, description="milliseconds per running sequence, whatever its context")
    per_seq_ms_per_ktoken: float = Field(ge=0, description="milliseconds per running sequence per 1000 context tokens")
    per_seq_tp_exponent: float = Field(0.9, ge=-0.5, le=2.0)


class KVCacheParams(_Strict):
    """How much context one engine holds, and what happens when it is full."""

    gpu_memory_gb: float = Field(80.0, gt=0)
    memory_utilization: float = Field(0.9, gt=0, le=1)
    weights_gb: float = Field(ge=0)
    bytes_per_token: float = Field(gt=0, description="KV bytes per context token, all layers")
    effective_ktokens_at_ref_tp: float | None = Field(
        None, gt=0, description="a capacity the data showed below the physical one (None: physical)")
    saturation_penalty: float = Field(1.0, ge=1.0, le=5.0, description="step-time factor while requests wait for KV")

    def free_gb(self, tp: int) -> float:
        return tp * self.gpu_memory_gb * self.memory_utilization - self.weights_gb

    def capacity_tokens(self, tp: int, ref_tp: int) -> float:
        """Context tokens a TP ``tp`` engine can hold: physical, or the effective one scaled by free memory."""
        free = self.free_gb(tp)
        if free <= 0:
            return 0.0
        physical = free * 1e9 / self.bytes_per_token
        if self.effective_ktokens_at_ref_tp is None:
            return physical
        ref_free = self.free_gb(ref_tp)
        if ref_free <= 0:
            return physical
        return min(physical, self.effective_ktokens_at_ref_tp * 1000.0 * free / ref_free)


class KVTransferParams(_Strict):
    """The PD KV transfer: a pure delay of ``latency + bytes / bandwidth`` per request."""

    pack_gb_s: float = Field(20.0, gt=0, description="prefill and decode on one node (NVLink / CUDA IPC)")
    spread_gb_s: float = Field(10.0, gt=0, description="across nodes (the study's healthy EFA SRD: 10-12 GB/s)")
    latency_ms: float = Field(1.0, ge=0)
    source: str = "assumed default: 20 GB/s on one node, 10 GB/s across nodes (EFA SRD), 1 ms latency"


class OverheadParams(_Strict):
    """Time outside the engines, and the closed loop's synchronisation."""

    fixed_ms: float = Field(ge=0, description="client + ingress + router + tokenizer, every request")
    jitter_ms: float = Field(ge=0, description="mean of an exponential random delay on top")
    pd_extra_ms: float = Field(0.0, description="the PD path's extra hop, besides the KV transfer")
    convoy: float = Field(0.0, ge=0, le=1, description="collocated closed loops: 0 independent, 1 in lockstep")


class ModelParams(_Strict):
    """Everything the analytic model needs, at the reference TP ``ref_tp``."""

    ref_tp: int = Field(ge=1)
    prefill: PrefillParams
    decode: DecodeParams
    kv_cache: KVCacheParams
    kv_transfer: KVTransferParams = KVTransferParams()
    overheads: OverheadParams


class MetricQuality(_Strict):
    """Median absolute percentage error of one metric over the calibration points."""

    in_sample_mdape: float
    leave_one_config_out_mdape: float | None
    points: int


class Calibration(_Strict):
    """How a profile was made, and how well it reproduces what it was made from."""

    source: list[str]
    points: int
    configs: list[str]
    tps: list[int]
    isl: list[int]
    osl: list[int]
    loads: list[float]
    requests_per_slot: int | None
    fitted: list[str]
    assumed: dict[str, str] = Field(description="parameter -> why the data could not identify it")
    quality: dict[str, MetricQuality]
    #: log(predicted / measured) per metric, per calibration point, when its config was left out of the fit
    loco_log_residuals: dict[str, list[float]]
    in_sample_log_residuals: dict[str, list[float]]
    bootstrap: list[ModelParams] = Field(default_factory=list)
    seed: int = 0


class Profile(_Strict):
    """A calibrated (or hand-written) profile of one model on one hardware fingerprint."""

    kind: Literal["pdperf-planner-profile"] = "pdperf-planner-profile"
    schema_version: Literal[1] = 1
    hardware_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    params: ModelParams
    calibration: Calibration | None = None
    created_at: str = ""
    command: str = ""


# ----------------------------------------------------------------------------------------------
# files


def profile_path(root: Path, hardware_id: str, model: str) -> Path:
    """Where a profile store keeps the profile of ``model`` on ``hardware_id``: ``root/<hardware>/<model>.json``."""
    return Path(root) / hardware_id / f"{model}.json"


def save_profile(path: Path, profile: Profile) -> None:
    atomic_write_text(Path(path), json.dumps(profile.model_dump(mode="json"), indent=1) + "\n")


def load_profile(path: Path, *, hardware_id: str | None = None, model: str | None = None) -> Profile:
    """A profile file, or from a store folder the one of ``hardware_id`` and ``model``."""
    path = Path(path)
    if path.is_dir():
        if not hardware_id or not model:
            raise PlannerError(f"{path}: is a profile folder; pass --hardware-id and --model to pick a profile, "
                               "or the profile's .json file")
        path = profile_path(path, hardware_id, model)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlannerError(f"{path}: no such profile; make one with `python -m pdperf.planner calibrate`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlannerError(f"{path}: not a JSON profile ({e}); pass a file written by `pdperf.planner calibrate`") \
            from None
    if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
        raise PlannerError(f"{path}: not a planner profile (no \"kind\": \"{PROFILE_KIND}\"); pass a file written "
                           "by `python -m pdperf.planner calibrate`")
    if data.get("schema_version") != PROFILE_SCHEMA_VERSION:
        raise PlannerError(f"{path}: profile schema_version {data.get('schema_version')} is not "
                           f"{PROFILE_SCHEMA_VERSION}; re-run calibrate")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise PlannerError(f"{path}: invalid profile at '{where}': {first['msg']}; re-run calibrate or fix the key") \
            from None
    for what, want, have in (("hardware_id", hardware_id, profile.hardware_id), ("model", model, profile.model)):
        if want and want != have:
            raise PlannerError(f"{path}: profile is for {what} '{have}', not '{want}'; pick the matching profile")
    return profile


# ----------------------------------------------------------------------------------------------
# profile -> costs


def role_costs(params: ModelParams, engines: int, tp: int, *, collocated: bool = False) -> RoleCosts:
    """One role's engines at TP ``tp`` (``collocated``: engines that mix prompts into decode steps)."""
    r = tp / params.ref_tp
    p, d = params.prefill, params.decode
    p_scale = r ** (-p.tp_exponent) * (p.collocated_factor if collocated else 1.0)
    return RoleCosts(
        engines=engines, tp=tp,
        prefill_s_per_token=p.ms_per_ktoken / 1e6 * p_scale,
        prefill_s_per_request=p.ms_per_request / 1e3 * p_scale,
        chunk_tokens=p.chunk_tokens,
        step_s=d.step_ms / 1e3 * r ** (-d.step_tp_exponent),
        per_seq_s=d.per_seq_ms / 1e3 * r ** (-d.per_seq_tp_exponent),
        per_seq_s_per_token=d.per_seq_ms_per_ktoken / 1e6 * r ** (-d.per_seq_tp_exponent),
        kv_capacity_tokens=params.kv_cache.capacity_tokens(tp, params.ref_tp),
        saturation_penalty=params.kv_cache.saturation_penalty)


def kv_bandwidth_gb_s(params: ModelParams, placement: str) -> float:
    """PD KV bandwidth: on one node when packed, else across nodes ('any' may cross them)."""
    return params.kv_transfer.pack_gb_s if placement == "pack" else params.kv_transfer.spread_gb_s


def resolve(params: ModelParams, deployment: Deployment) -> SystemCosts:
    """The costs of ``deployment`` under ``params`` (what both the model and the simulator read)."""
    o = params.overheads
    if deployment.kind == "collocated":
        return SystemCosts(kind="collocated", prefill=role_costs(params, deployment.prefill_replicas,
                                                                  deployment.prefill_tp, collocated=True),
                           decode=None, overhead_s=o.fixed_ms / 1e3, jitter_s=o.jitter_ms / 1e3, convoy=o.convoy)
    bw = kv_bandwidth_gb_s(params, deployment.placement)
    return SystemCosts(kind="pd", prefill=role_costs(params, deployment.prefill_replicas, deployment.prefill_tp),
                       decode=role_costs(params, deployment.decode_replicas, deployment.decode_tp),
                       kv_s_per_token=params.kv_cache.bytes_per_token / (bw * 1e9),
                       kv_latency_s=params.kv_transfer.latency_ms / 1e3,
                       overhead_s=max(o.fixed_ms + o.pd_extra_ms, 0.0) / 1e3, jitter_s=o.jitter_ms / 1e3,
                       convoy=o.convoy)


# ----------------------------------------------------------------------------------------------
# calibration data


@dataclass(frozen=True)
class MeasuredPoint:
    """One measured load point of one configuration: what the fit compares the model with."""

    config: str
    deployment: Deployment
    point: WorkloadPoint
    med_ttft_ms: float
    med_tpot_ms: float
    out_tok_s: float
    p99_ttft_ms: float | None = None
    p99_tpot_ms: float | None = None
    requests: int | None = None
    kv_bandwidth_gb_s: float | None = None  # from NIXL telemetry, PD points only
    # the mean KV transfer time, and whether the bytes behind kv_bandwidth_gb_s are Ray's bucket
    # midpoints (buckets x4 apart): the fit then takes the size from the model's KV bytes per token
    kv_transfer_s: float | None = None
    kv_bytes_estimated: bool = False
    source: str = ""

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


CSV_REQUIRED = ("config", "kind", "prefill_or_collocated_replicas", "prefill_or_collocated_tp", "decode_replicas",
                "decode_tp", "concurrency", "med_ttft_ms", "med_tpot_ms", "out_tok_s")
CSV_OPTIONAL = ("gpus", "requests", "p99_ttft_ms", "p99_tpot_ms", "isl", "osl", "placement")


def load_study_csv(path: Path, *, isl: int | None = None, osl: int | None = None,
                   requests_per_slot: int | None = None) -> list[MeasuredPoint]:
    """Points of a CSV in the reference study's calibration format (closed loop, one row per point).

    ``isl``/``osl`` are needed when the file has no such columns. ``requests_per_slot`` defaults to
    ``requests / concurrency`` when the file has a ``requests`` column (the study: 5).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlannerError(f"{path}: no such calibration CSV; pass the path of a file like "
                           "/work/shared/reference-study/calibration.csv") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise PlannerError(f"{path}: not a CSV text file; pass a calibration CSV (or use --runs for run folders)") \
            from None
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise PlannerError(f"{path}: missing column(s) {', '.join(missing)}; the calibration CSV needs "
                           f"{', '.join(CSV_REQUIRED)} (optional: {', '.join(CSV_OPTIONAL)})")
    for name, given in (("isl", isl), ("osl", osl)):
        if name not in header and given is None:
            raise PlannerError(f"{path}: no '{name}' column; pass --{name} (the reference study: --isl 5000 --osl 250)")
    points: list[MeasuredPoint] = []
    for lineno, row in enumerate(reader, start=2):
        def num(col: str, cast=float, required: bool = True, row=row, lineno=lineno):
            raw = (row.get(col) or "").strip()
            if raw == "" and not required:
                return None
            try:
                v = cast(float(raw)) if cast is int else cast(raw)
            except ValueError:
                raise PlannerError(f"{path}:{lineno}: column '{col}' is '{raw}', not a number; fix the row") from None
            if cast is int and float(raw) != int(float(raw)):
                raise PlannerError(f"{path}:{lineno}: column '{col}' is '{raw}', not a whole number; fix the row")
            if isinstance(v, float) and not math.isfinite(v):
                raise PlannerError(f"{path}:{lineno}: column '{col}' is '{raw}'; fix the row")
            return v
        kind = (row.get("kind") or "").strip()
        if kind not in ("collocated", "pd"):
            raise PlannerError(f"{path}:{lineno}: column 'kind' is '{kind}'; use 'collocated' or 'pd'")
        placement = (row.get("placement") or "pack").strip() or "pack"
        if placement not in ("pack", "spread", "any"):
            raise PlannerError(f"{path}:{lineno}: column 'placement' is '{placement}'; use pack, spread or any")
        try:
            if kind == "collocated":
                dep = Deployment.collocated(num("prefill_or_collocated_replicas", int),
                                            num("prefill_or_collocated_tp", int))
            else:
                dep = Deployment.pd(num("prefill_or_collocated_replicas", int), num("prefill_or_collocated_tp", int),
                                    num("decode_replicas", int), num("decode_tp", int),
                                    placement)  # type: ignore[arg-type]
        except ValueError as e:
            raise PlannerError(f"{path}:{lineno}: {e}") from None
        gpus = num("gpus", int, required=False) if "gpus" in header else None
        if gpus is not None and gpus != dep.gpus:
            raise PlannerError(f"{path}:{lineno}: column 'gpus' is {gpus} but {dep.label} uses {dep.gpus}; fix the row")
        conc = num("concurrency", int)
        requests = num("requests", int, required=False) if "requests" in header else None
        rps = requests_per_slot
        if rps is None and requests:
            rps = max(int(round(requests / conc)), 1)
        row_isl = num("isl", int) if "isl" in header else isl
        row_osl = num("osl", int) if "osl" in header else osl
        try:
            wp = WorkloadPoint(int(row_isl), int(row_osl), "concurrency", float(conc), rps)  # type: ignore[arg-type]
        except ValueError as e:
            raise PlannerError(f"{path}:{lineno}: {e}") from None
        values = {m: num(m) for m in ("med_ttft_ms", "med_tpot_ms", "out_tok_s")}
        for m, v in values.items():
            if v <= 0:
                raise PlannerError(f"{path}:{lineno}: column '{m}' is {v}; measured values must be > 0")
        points.append(MeasuredPoint(
            config=row["config"].strip() or dep.name, deployment=dep, point=wp, **values,
            p99_ttft_ms=num("p99_ttft_ms", required=False) if "p99_ttft_ms" in header else None,
            p99_tpot_ms=num("p99_tpot_ms", required=False) if "p99_tpot_ms" in header else None,
            requests=requests, source=f"{path}:{lineno}"))
    if not points:
        raise PlannerError(f"{path}: no rows; a calibration CSV needs one row per measured point")
    return points


def _point_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((p / "points").glob("*.json")) if (p / "points").is_dir() else sorted(p.glob("*.json"))
            if not found:
                raise PlannerError(f"{p}: no points/*.json; pass run folders (reports/<run-id>) or point JSON files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PlannerError(f"{p}: no such run folder or point file; pass reports/<run-id> folders or "
                               "points/*.json files")
    return files


def load_run_points(paths: Sequence[Path], *, topology_dir: Path | None = None) -> tuple[list[MeasuredPoint], str, str]:
    """The suite's own measured points (run folders or point files), with their hardware id and model.

    Each point's configuration comes from ``topologies/<topology>.yaml``; ISL and OSL from its
    requests' token counts; KV bandwidth from its NIXL telemetry where present.
    """
    from pdperf.errors import SpecError
    from pdperf.planner.predict import measured_point
    from pdperf.report.rundata import ReportError, load_point_file
    from pdperf.specs import TOPOLOGY_DIR, load_topology

    tdir = Path(topology_dir) if topology_dir else TOPOLOGY_DIR
    out: list[MeasuredPoint] = []
    hardware: set[str] = set()
    models: set[str] = set()
    for f in _point_files(paths):
        try:
            pr = load_point_file(f)
        except ReportError as e:
            raise PlannerError(str(e)) from None
        try:
            topo = load_topology(tdir / f"{pr.topology}.yaml")
        except SpecError as e:
            raise PlannerError(f"{f}: topology '{pr.topology}' cannot be read ({e}); the planner needs its "
                               f"spec in {tdir}") from None
        if topo.device != "gpu":
            raise PlannerError(f"{f}: topology '{pr.topology}' is a CPU topology; profiles are fitted to GPU runs")
        try:
            mp = measured_point(pr, topo)
        except PlannerError as e:
            raise PlannerError(f"{f}: {e}") from None
        out.append(MeasuredPoint(**{**mp.__dict__, "source": str(f)}))
        hardware.add(pr.environment.hardware_id or "unknown")
        models.add(pr.environment.model or "unknown")
    if len(hardware) > 1:
        raise PlannerError(f"points from {len(hardware)} hardware fingerprints ({', '.join(sorted(hardware))}); "
                           "a profile is per hardware: calibrate each separately")
    if len(models) > 1:
        raise PlannerError(f"points of {len(models)} models ({', '.join(sorted(models))}); a profile is per model: "
                           "calibrate each separately")
    return out, hardware.pop(), models.pop()
