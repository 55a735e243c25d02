"""Fitting a profile to measured points, and saying how well it fits and how sure it is.

Why this shape: a study gives few configurations (the reference study: 4 x 6 points), so
the model has a dozen parameters, each with a physical meaning and a bound, and the fit
decides from the data which of them it can identify (two TPs are needed for a TP exponent,
two prompt lengths for a per-request cost, collocated closed-loop points for the convoy
share, a saturated point for an effective KV capacity). The rest keep a stated value and the
profile lists each with the reason.

- Objective: log(predicted / measured) of median TTFT, median TPOT and output tokens/s
  (weight 1) and p99 TTFT (weight 0.5: 20-320 requests make it noisy) at every point, plus a
  weak pull of each parameter towards its starting value so that flat directions stay put.
- Optimiser: Levenberg-Marquardt in numpy on bounded parameters (each mapped through a
  logistic onto its range, log-scaled where it is a scale), from a few starting points.
- Fit quality: median absolute percentage error per metric, in-sample and leave one
  configuration out (each configuration predicted by a fit that never saw it: the honest
  number for a configuration nobody measured).
- Uncertainty: a bootstrap of fits on points resampled within each configuration; a
  prediction's interval combines those parameter sets with the leave-one-config-out
  residuals (see :func:`pdperf.planner.predict.predict_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdperf.planner.facts import ModelFacts
from pdperf.planner.model import solve
from pdperf.planner.profiles import (
    Calibration,
    DecodeParams,
    KVCacheParams,
    KVTransferParams,
    MeasuredPoint,
    MetricQuality,
    ModelParams,
    OverheadParams,
    PlannerError,
    PrefillParams,
    Profile,
    resolve,
)

#: Metrics the fit compares, with their weights.
FIT_METRICS: dict[str, float] = {"med_ttft_ms": 1.0, "med_tpot_ms": 1.0, "out_tok_s": 1.0, "p99_ttft_ms": 0.5}
REPORT_METRICS = ("med_ttft_ms", "p99_ttft_ms", "med_tpot_ms", "out_tok_s")
_FAIL_RESIDUAL = 3.0  # log-ratio charged when the model has no answer (an overloaded stage)
_PRIOR_WEIGHT = 0.02


@dataclass(frozen=True)
class FreeParam:
    """A fitted parameter: dotted path in ModelParams, its range, and whether it is a scale."""

    path: str
    lo: float
    hi: float
    log: bool

    def to_value(self, u: float) -> float:
        s = 1.0 / (1.0 + math.exp(-max(min(u, 40.0), -40.0)))
        if self.log:
            return self.lo * (self.hi / self.lo) ** s
        return self.lo + (self.hi - self.lo) * s

    def to_u(self, value: float) -> float:
        if self.log:
            s = math.log(value / self.lo) / math.log(self.hi / self.lo)
        else:
            s = (value - self.lo) / (self.hi - self.lo)
        s = min(max(s, 1e-4), 1 - 1e-4)
        return math.log(s / (1 - s))


def _set(params: ModelParams, values: dict[str, float]) -> ModelParams:
    groups: dict[str, dict[str, float]] = {}
    for path, v in values.items():
        group, key = path.split(".")
        groups.setdefault(group, {})[key] = v
    return params.model_copy(update={g: getattr(params, g).model_copy(update=kv) for g, kv in groups.items()})


def _get(params: ModelParams, path: str) -> float:
    group, key = path.split(".")
    return getattr(getattr(params, group), key)


@dataclass(frozen=True)
class Plan:
    """Which parameters this data set identifies, their ranges, and why the others are assumed."""

    free: tuple[FreeParam, ...]
    assumed: dict[str, str]


def identify(points: Sequence[MeasuredPoint], start: ModelParams) -> Plan:
    """Decide from the data which parameters can be fitted."""
    prefill_tps = {p.deployment.prefill_tp for p in points}
    decode_tps = {p.deployment.decode_tp if p.deployment.kind == "pd" else p.deployment.prefill_tp for p in points}
    isls = {p.point.isl for p in points}
    kinds = {p.deployment.kind for p in points}
    closed_colloc = any(p.deployment.kind == "collocated" and p.point.load == "concurrency" for p in points)
    free = [FreeParam("prefill.ms_per_ktoken", 0.2, 500.0, True),
            FreeParam("decode.step_ms", 0.2, 200.0, True),
            FreeParam("decode.per_seq_ms_per_ktoken", 1e-4, 2.0, True),
            FreeParam("overheads.fixed_ms", 0.5, 5000.0, True),
            FreeParam("overheads.jitter_ms", 0.5, 5000.0, True)]
    assumed: dict[str, str] = {}
    if len(prefill_tps) >= 2:
        free.append(FreeParam("prefill.tp_exponent", 0.1, 1.3, False))
    else:
        assumed["prefill.tp_exponent"] = f"one prefill TP in the data ({sorted(prefill_tps)}): assumed " \
                                         f"{start.prefill.tp_exponent:g}"
    if len(decode_tps) >= 2:
        free.append(FreeParam("decode.step_tp_exponent", -0.3, 1.3, False))
        free.append(FreeParam("decode.per_seq_tp_exponent", 0.0, 1.8, False))
    else:
        assumed["decode.step_tp_exponent"] = f"one decode TP in the data: assumed {start.decode.step_tp_exponent:g}"
        assumed["decode.per_seq_tp_exponent"] = f"one decode TP in the data: assumed " \
                                                f"{start.decode.per_seq_tp_exponent:g}"
    if len(isls) >= 2:
        free.append(FreeParam("prefill.ms_per_request", 0.0, 2000.0, False))
        free.append(FreeParam("decode.per_seq_ms", 0.0, 5.0, False))
    else:
        assumed["prefill.ms_per_request"] = (f"one ISL in the data ({sorted(isls)}): a fixed prefill cost cannot be "
                                             "told from the per-token slope; 0, folded into the slope and overheads")
        assumed["decode.per_seq_ms"] = ("one ISL in the data: per-sequence decode cost cannot be told from its "
                                        "context-proportional part; 0, all of it scales with context")
    if kinds == {"pd", "collocated"}:
        free.append(FreeParam("overheads.pd_extra_ms", -300.0, 2000.0, False))
        free.append(FreeParam("prefill.collocated_factor", 0.3, 5.0, True))
    else:
        assumed["prefill.collocated_factor"] = (f"PD and collocated points are both needed to compare prompt costs: "
                                                f"assumed {start.prefill.collocated_factor:g}")
        assumed["overheads.pd_extra_ms"] = f"no {'collocated' if kinds == {'pd'} else 'PD'} points to compare " \
                                           f"with: assumed {start.overheads.pd_extra_ms:g} ms"
    if closed_colloc:
        free.append(FreeParam("overheads.convoy", 0.0, 1.0, False))
    else:
        assumed["overheads.convoy"] = f"no collocated closed-loop points: assumed {start.overheads.convoy:g}"
    physical_k = start.kv_cache.capacity_tokens(start.ref_tp, start.ref_tp) / 1000.0
    free.append(FreeParam("kv_cache.effective_ktokens_at_ref_tp", min(5.0, physical_k / 2), physical_k, True))
    free.append(FreeParam("kv_cache.saturation_penalty", 1.0, 3.0, False))
    assumed["prefill.chunk_tokens"] = (f"{start.prefill.chunk_tokens} tokens per step (vLLM's max_num_batched_tokens "
                                       "for its OpenAI server on >= 70 GiB GPUs)")
    assumed["kv_cache.memory"] = (f"{start.kv_cache.gpu_memory_gb:g} GB per GPU x {start.kv_cache.memory_utilization:g}"
                                  f" usable, weights {start.kv_cache.weights_gb:g} GB, "
                                  f"{start.kv_cache.bytes_per_token:g} KV bytes per token")
    if not any(p.kv_bandwidth_gb_s for p in points):
        assumed["kv_transfer"] = start.kv_transfer.source
    return Plan(free=tuple(free), assumed=assumed)


def residuals(params: ModelParams, points: Sequence[MeasuredPoint]) -> dict[str, list[float | None]]:
    """log(predicted / measured) per metric and point (None where the point has no such value)."""
    out: dict[str, list[float | None]] = {m: [] for m in REPORT_METRICS}
    for mp in points:
        try:
            pred = solve(resolve(params, mp.deployment), mp.point, mp.deployment)
            predicted = {m: pred.metric(m) for m in REPORT_METRICS}
        except (ValueError, ZeroDivisionError, OverflowError):
            predicted = {m: math.nan for m in REPORT_METRICS}
        for m in REPORT_METRICS:
            meas = mp.value(m)
            if meas is None or meas <= 0:
                out[m].append(None)
                continue
            p = predicted[m]
            out[m].append(math.log(p / meas) if (p and math.isfinite(p) and p > 0) else
                          (_FAIL_RESIDUAL if not (p and p > 0) or p == math.inf else -_FAIL_RESIDUAL))
    return out


def _vector(params: ModelParams, points: Sequence[MeasuredPoint]) -> np.ndarray:
    res = residuals(params, points)
    parts: list[float] = []
    for m, w in FIT_METRICS.items():
        parts.extend(w * v for v in res[m] if v is not None)
    return np.asarray(parts, dtype=float)


def _levenberg_marquardt(fun: Callable[[np.ndarray], np.ndarray], u0: np.ndarray, *, max_iter: int = 60,
                         step: float = 1e-3) -> tuple[np.ndarray, float]:
    u = u0.copy()
    r = fun(u)
    cost = float(r @ r)
    lam = 1e-2
    for _ in range(max_iter):
        jac = np.empty((len(r), len(u)))
        for k in range(len(u)):
            du = np.zeros_like(u)
            du[k] = step
            jac[:, k] = (fun(u + du) - r) / step
        g = jac.T @ r
        a = jac.T @ jac
        improved = False
        while lam < 1e8:
            try:
                delta = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-9), -g)
            except np.linalg.LinAlgError:
                lam *= 4
                continue
            r_new = fun(u + delta)
            c_new = float(r_new @ r_new)
            if c_new < cost:
                rel = (cost - c_new) / max(cost, 1e-12)
                u, r, cost = u + delta, r_new, c_new
                lam = max(lam / 3, 1e-7)
                improved = True
                break
            lam *= 4
        if not improved or rel < 1e-7:
            break
    return u, cost


def fit_params(points: Sequence[MeasuredPoint], start: ModelParams, *, starts: Sequence[ModelParams] = (),
               max_iter: int = 60) -> tuple[ModelParams, Plan, float]:
    """Least-squares fit of the identified parameters; returns the params, the plan and the cost."""
    if not points:
        raise PlannerError("calibration: no measured points to fit")
    plan = identify(points, start)
    free = plan.free

    def params_of(u: np.ndarray) -> ModelParams:
        return _set(start, {fp.path: fp.to_value(float(x)) for fp, x in zip(free, u)})

    def start_value(init: ModelParams, fp: FreeParam) -> float:
        v = _get(init, fp.path)
        return fp.hi * 0.999 if v is None else min(max(v, fp.lo), fp.hi)  # None: no effective KV limit yet

    u_start = np.array([fp.to_u(start_value(start, fp)) for fp in free])

    def fun(u: np.ndarray) -> np.ndarray:  # the weak pull is towards the first start, whichever start runs
        return np.concatenate([_vector(params_of(u), points), _PRIOR_WEIGHT * (u - u_start)])

    inits = [np.array([fp.to_u(start_value(init, fp)) for fp in free]) for init in (start, *starts)]
    if len(inits) > 2:  # screen every start briefly, polish the two best
        screened = sorted((_levenberg_marquardt(fun, u0, max_iter=8) for u0 in inits), key=lambda t: t[1])
        inits = [u for u, _ in screened[:2]]
    best: tuple[float, np.ndarray] | None = None
    for u0 in inits:
        u, cost = _levenberg_marquardt(fun, u0, max_iter=max_iter)
        if best is None or cost < best[0]:
            best = (cost, u)
    assert best is not None
    fitted = params_of(best[1])
    fitted, plan = _settle_kv(fitted, plan, points)
    return fitted, plan, best[0]


def _settle_kv(params: ModelParams, plan: Plan, points: Sequence[MeasuredPoint]) -> tuple[ModelParams, Plan]:
    """Keep an effective KV capacity only if the data needs it (some point runs into it)."""
    kv = params.kv_cache
    if kv.effective_ktokens_at_ref_tp is None:
        return params, plan
    physical = kv.model_copy(update={"effective_ktokens_at_ref_tp": None, "saturation_penalty": 1.0})
    without = params.model_copy(update={"kv_cache": physical})
    c_with = float(np.sum(_vector(params, points) ** 2))
    c_without = float(np.sum(_vector(without, points) ** 2))
    if c_without <= c_with * 1.01:
        assumed = dict(plan.assumed)
        assumed["kv_cache.effective_ktokens_at_ref_tp"] = ("no point ran into the KV cache: the physical capacity "
                                                           "(free memory / KV bytes per token) is assumed")
        assumed["kv_cache.saturation_penalty"] = "no point ran into the KV cache: 1.0 assumed"
        free = tuple(fp for fp in plan.free if not fp.path.startswith("kv_cache."))
        return without, Plan(free=free, assumed=assumed)
    return params, plan


# ----------------------------------------------------------------------------------------------


def initial_params(points: Sequence[MeasuredPoint], facts: ModelFacts, *, gpu_memory_gb: float = 80.0,
                   memory_utilization: float = 0.9, kv_transfer: KVTransferParams | None = None) -> ModelParams:
    """Starting values from the data's own scale (lowest-load TPOT and TTFT), at the data's smallest TP."""
    ref_tp = min({p.deployment.prefill_tp for p in points} |
                 {p.deployment.decode_tp for p in points if p.deployment.decode_tp})
    low = min(points, key=lambda p: p.point.value)
    isl = low.point.isl
    ctx = isl + low.point.osl / 2
    step_ms = max(low.med_tpot_ms * 0.8, 0.5)
    per_seq_ktok = max(low.med_tpot_ms * 0.05 / (ctx / 1000.0), 1e-4)
    prefill_ms = max(low.med_ttft_ms * 0.3, 1.0)
    bw, sized = _kv_bandwidths(points, facts.kv_bytes_per_token)
    transfer = kv_transfer or KVTransferParams()
    if bw:
        med = float(np.median(bw))
        how = (f"; {sized} of them sized by the model's {facts.kv_bytes_per_token:g} KV bytes per token x ISL, their "
               "bytes being Ray's bucket midpoints") if sized else ""
        transfer = transfer.model_copy(update={"pack_gb_s": med, "spread_gb_s": min(med, transfer.spread_gb_s),
                                               "source": f"NIXL telemetry of {len(bw)} PD points: median {med:.2f} "
                                                         "GB/s (used on one node; across nodes the lower of it and "
                                                         f"{transfer.spread_gb_s:g} GB/s{how})"})
    return ModelParams(
        ref_tp=ref_tp,
        prefill=PrefillParams(ms_per_ktoken=prefill_ms / (isl / 1000.0), tp_exponent=0.8),
        decode=DecodeParams(step_ms=step_ms, step_tp_exponent=0.3, per_seq_ms_per_ktoken=per_seq_ktok,
                            per_seq_tp_exponent=0.9),
        kv_cache=KVCacheParams(gpu_memory_gb=gpu_memory_gb, memory_utilization=memory_utilization,
                               weights_gb=facts.weights_gb, bytes_per_token=facts.kv_bytes_per_token,
                               effective_ktokens_at_ref_tp=None, saturation_penalty=1.0),
        kv_transfer=transfer,
        overheads=OverheadParams(fixed_ms=max(low.med_ttft_ms * 0.4, 1.0), jitter_ms=max(low.med_ttft_ms * 0.2, 1.0),
                                 pd_extra_ms=0.0, convoy=0.3))


def _kv_bandwidths(points: Sequence[MeasuredPoint], kv_bytes_per_token: float) -> tuple[list[float], int]:
    """Each PD point's KV bandwidth (GB/s), and how many were sized from the model: where the
    bytes are Ray's bucket midpoints (x4 buckets: 84 MB stood for 34-134 MB on one H200), a
    transfer is the prompt's KV, ISL x the model's KV bytes per token, over the transfer time."""
    out, sized = [], 0
    for p in points:
        if p.kv_bytes_estimated and p.kv_transfer_s:
            out.append(p.point.isl * kv_bytes_per_token / p.kv_transfer_s / 1e9)
            sized += 1
        elif p.kv_bandwidth_gb_s:
            out.append(p.kv_bandwidth_gb_s)
    return out, sized


def _starts(base: ModelParams, points: Sequence[MeasuredPoint] = ()) -> list[ModelParams]:
    """Alternative starting points. The objective has separate basins: with the KV capacity at its
    physical value no point saturates and the fit cannot feel a knee, so one start per configuration
    puts the capacity at that configuration's largest measured occupancy (decode batch from Little's
    law, out_tok_s x TPOT, times the context a sequence holds), with busier prompts."""
    kv = base.kv_cache
    busier = {"prefill.ms_per_ktoken": base.prefill.ms_per_ktoken * 0.5, "prefill.collocated_factor": 1.5,
              "overheads.fixed_ms": base.overheads.fixed_ms * 1.5}
    out = [_set(base, {**busier, "decode.per_seq_ms_per_ktoken": base.decode.per_seq_ms_per_ktoken * 1.5})]
    occupancy: dict[str, float] = {}
    for p in points:
        dep = p.deployment
        engines, tp = (dep.decode_replicas, dep.decode_tp) if dep.kind == "pd" else (dep.prefill_replicas,
                                                                                      dep.prefill_tp)
        held = p.out_tok_s * p.med_tpot_ms / 1000.0 / engines * (p.point.isl + p.point.osl / 2.0)
        ref_free, free = kv.free_gb(base.ref_tp), kv.free_gb(tp)
        if free > 0 and ref_free > 0:
            occupancy[p.config] = max(occupancy.get(p.config, 0.0), held * ref_free / free / 1000.0)
    physical = kv.capacity_tokens(base.ref_tp, base.ref_tp) / 1000.0
    for k in sorted(set(occupancy.values())):
        if 1.0 < k < physical:
            out.append(_set(base, {**busier, "kv_cache.effective_ktokens_at_ref_tp": k * 0.95,
                                   "kv_cache.saturation_penalty": 1.3}))
    return out


def _with_kv_start(params: ModelParams) -> ModelParams:
    if params.kv_cache.effective_ktokens_at_ref_tp is None:
        physical = params.kv_cache.capacity_tokens(params.ref_tp, params.ref_tp) / 1000.0
        return _set(params, {"kv_cache.effective_ktokens_at_ref_tp": physical * 0.999})
    return params


def _mdape(res: Sequence[float | None]) -> float:
    vals = [abs(math.exp(r) - 1) * 100 for r in res if r is not None]
    return float(np.median(vals)) if vals else math.nan


def calibrate(points: Sequence[MeasuredPoint], *, hardware_id: str, model: str, facts: ModelFacts,
              source: Sequence[str], bootstrap: int = 20, seed: int = 0, gpu_memory_gb: float = 80.0,
              memory_utilization: float = 0.9, kv_transfer: KVTransferParams | None = None, command: str = "",
              created_at: str = "", progress: Callable[[str], None] | None = None) -> Profile:
    """Fit a profile to ``points``; leave each configuration out once; bootstrap ``bootstrap`` refits."""
    say = progress or (lambda _msg: None)
    configs = sorted({p.config for p in points})
    if len(points) < 4:
        raise PlannerError(f"calibration: {len(points)} points; a profile needs at least 4 (better: 2+ "
                           "configurations x 4+ loads)")
    base = _with_kv_start(initial_params(points, facts, gpu_memory_gb=gpu_memory_gb,
                                         memory_utilization=memory_utilization, kv_transfer=kv_transfer))
    say(f"fitting {len(points)} points of {len(configs)} configurations")
    params, plan, _cost = fit_params(points, base, starts=_starts(base, points))
    in_sample = residuals(params, points)
    loco: dict[str, list[float | None]] = {m: [None] * len(points) for m in REPORT_METRICS}
    if len(configs) >= 2:
        for cfg in configs:
            say(f"leave-one-config-out: refitting without {cfg}")
            train = [p for p in points if p.config != cfg]
            held = [i for i, p in enumerate(points) if p.config == cfg]
            loco_params, _, _ = fit_params(train, base, starts=_starts(base, train))
            res = residuals(loco_params, [points[i] for i in held])
            for m in REPORT_METRICS:
                for i, v in zip(held, res[m]):
                    loco[m][i] = v
    rng = np.random.default_rng(seed)
    boots: list[ModelParams] = []
    by_config = {c: [p for p in points if p.config == c] for c in configs}
    start = _with_kv_start(params)
    for b in range(bootstrap):
        say(f"bootstrap {b + 1}/{bootstrap}")
        sample = [grp[i] for grp in by_config.values() for i in rng.integers(0, len(grp), size=len(grp))]
        bp, _, _ = fit_params(sample, start, max_iter=25)
        boots.append(bp)
    quality = {m: MetricQuality(in_sample_mdape=round(_mdape(in_sample[m]), 2),
                                leave_one_config_out_mdape=(round(_mdape(loco[m]), 2)
                                                            if any(v is not None for v in loco[m]) else None),
                                points=sum(1 for v in in_sample[m] if v is not None))
               for m in REPORT_METRICS}
    rps = {p.point.requests_per_slot for p in points}

    def clean(values: list[float | None]) -> list[float]:
        return [round(v, 5) for v in values if v is not None]

    calibration = Calibration(
        source=list(source), points=len(points), configs=configs,
        tps=sorted({p.deployment.prefill_tp for p in points} |
                   {p.deployment.decode_tp for p in points if p.deployment.decode_tp}),
        isl=sorted({p.point.isl for p in points}), osl=sorted({p.point.osl for p in points}),
        loads=sorted({p.point.value for p in points}),
        requests_per_slot=rps.pop() if len(rps) == 1 else None,
        fitted=[fp.path for fp in plan.free], assumed=plan.assumed, quality=quality,
        loco_log_residuals={m: clean(loco[m]) for m in REPORT_METRICS},
        in_sample_log_residuals={m: clean(in_sample[m]) for m in REPORT_METRICS},
        bootstrap=boots, seed=seed)
    return Profile(hardware_id=hardware_id, model=model, params=params, calibration=calibration,
                   created_at=created_at, command=command)
