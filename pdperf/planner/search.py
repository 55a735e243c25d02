"""Search: which layout of a GPU budget gives the most goodput per GPU under an SLO, and how sure.

Why: the question before spending GPUs is not "how fast is 1P:3D" but "of every layout I
could deploy on these nodes, which one serves this workload within the SLO at the lowest
cost, and is the answer robust to what the model does not know". So the search

1. enumerates every feasible layout: collocated ``R x TP``; PD ``Rp x TPp : Rd x TPd`` with
   NixlConnector's rule (prefill TP <= decode TP), every engine within one node, placed
   ``pack`` (one node), ``spread`` (prefill on one node, decode on another) or ``any``
   (a role across nodes; KV may cross nodes, so it gets the cross-node bandwidth);
2. predicts each at the load point (point estimate) and ranks by goodput per GPU:
   output tokens/s of the requests whose own TTFT and TPOT meet the SLO bounds, divided by
   the GPUs used; a layout whose predicted percentiles miss the SLO ranks below every one
   that meets it;
3. for the leading candidates, reruns the prediction with every bootstrap parameter set:
   the probability that the SLO holds, an interval of goodput per GPU, and how often each
   candidate is the best one (P(best)). A ranking whose P(best) is split is not a decision
   the data supports; the table says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pdperf.planner.model import Deployment, Prediction, WorkloadPoint
from pdperf.planner.predict import extrapolations, predict
from pdperf.planner.profiles import PlannerError, Profile
from pdperf.results import atomic_write_text
from pdperf.specs import SLO

SUPPORTED_SLO_METRICS = ("ttft_ms", "tpot_ms")


@dataclass(frozen=True)
class NodeShape:
    """The hardware the budget lives on: ``nodes`` nodes of ``gpus_per_node`` GPUs."""

    gpus_per_node: int
    nodes: int

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise PlannerError(f"node shape {self.nodes} x {self.gpus_per_node}: need >= 1 node of >= 1 GPU")

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


def _fits(engines: Sequence[int], shape: NodeShape, nodes: int | None = None) -> bool:
    """First-fit decreasing of engine TP sizes into ``nodes`` nodes (every engine inside one node)."""
    free = [shape.gpus_per_node] * (nodes if nodes is not None else shape.nodes)
    for size in sorted(engines, reverse=True):
        for i, f in enumerate(free):
            if f >= size:
                free[i] -= size
                break
        else:
            return False
    return True


def enumerate_deployments(budget: int, shape: NodeShape, *, tps: Iterable[int] = (1, 2, 4, 8),
                          kinds: Iterable[str] = ("collocated", "pd"), min_gpus: int = 1) -> list[Deployment]:
    """Every layout of at most ``budget`` GPUs (and at least ``min_gpus``) that fits ``shape``."""
    if budget < 1:
        raise PlannerError(f"--gpus {budget}: the budget must be at least 1 GPU")
    if budget > shape.gpus:
        raise PlannerError(f"--gpus {budget}: more than the {shape.gpus} GPUs of {shape.nodes} node(s) x "
                           f"{shape.gpus_per_node}; raise --nodes or lower --gpus")
    tp_list = sorted({t for t in tps if t <= shape.gpus_per_node})
    if not tp_list:
        raise PlannerError(f"--tps {list(tps)}: no TP fits a node of {shape.gpus_per_node} GPUs")
    out: list[Deployment] = []
    if "collocated" in kinds:
        for tp in tp_list:
            for r in range(1, budget // tp + 1):
                if min_gpus <= r * tp and _fits([tp] * r, shape):
                    out.append(Deployment.collocated(r, tp))
    if "pd" in kinds:
        for tp_p in tp_list:
            for tp_d in tp_list:
                if tp_p > tp_d:  # NixlConnector: prefill TP <= decode TP
                    continue
                for rp in range(1, budget // tp_p + 1):
                    for rd in range(1, (budget - rp * tp_p) // tp_d + 1):
                        total = rp * tp_p + rd * tp_d
                        if total < min_gpus:
                            continue
                        engines = [tp_p] * rp + [tp_d] * rd
                        if _fits(engines, shape, nodes=1):
                            out.append(Deployment.pd(rp, tp_p, rd, tp_d, "pack"))
                        elif shape.nodes >= 2 and _fits([tp_p] * rp, shape, 1) and _fits([tp_d] * rd, shape, 1):
                            out.append(Deployment.pd(rp, tp_p, rd, tp_d, "spread"))
                        elif _fits(engines, shape):
                            out.append(Deployment.pd(rp, tp_p, rd, tp_d, "any"))
    if not out:
        raise PlannerError(f"no layout of {min_gpus}-{budget} GPUs fits {shape.nodes} node(s) x "
                           f"{shape.gpus_per_node} GPUs with TPs {tp_list}; widen --tps or --gpus")
    return out


def parse_slos(texts: Sequence[str]) -> list[SLO]:
    """``["p99_ttft_ms <= 2000", ...]`` as SLOs the model can judge (TTFT and TPOT percentiles)."""
    from pdperf.errors import SpecError

    out = []
    for t in texts:
        try:
            slo = SLO.parse(t)
        except SpecError as e:
            raise PlannerError(str(e)) from None
        if slo.metric not in SUPPORTED_SLO_METRICS:
            raise PlannerError(f"SLO '{t}': the planner predicts {' and '.join(SUPPORTED_SLO_METRICS)} only; "
                               f"drop the {slo.metric} bound")
        out.append(slo)
    return out


def _slo_value(pred: Prediction, slo: SLO) -> float:
    dist = pred.ttft_dist if slo.metric == "ttft_ms" else pred.tpot_dist
    if pred.overloaded:
        return math.inf
    return dist.quantile(slo.percentile / 100.0)


def meets(pred: Prediction, slos: Sequence[SLO]) -> bool:
    return all(_slo_value(pred, s) <= s.bound for s in slos)


def goodput_tok_s(pred: Prediction, slos: Sequence[SLO]) -> float:
    """Output tokens/s of requests whose own TTFT and TPOT are within the SLO bounds."""
    ttft = min((s.bound for s in slos if s.metric == "ttft_ms"), default=None)
    tpot = min((s.bound for s in slos if s.metric == "tpot_ms"), default=None)
    return pred.out_tok_s * pred.attainment(ttft, tpot)


@dataclass(frozen=True)
class Candidate:
    """One layout's predicted standing under the SLO."""

    deployment: Deployment
    prediction: Prediction
    slo_values: dict[str, float]  # SLO key -> predicted value
    meets_slo: bool
    goodput_tok_s: float
    extrapolations: tuple[str, ...]
    p_slo: float | None = None  # share of bootstrap parameter sets under which the SLO holds
    goodput_per_gpu_interval: tuple[float, float] | None = None
    p_best: float | None = None

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_tok_s / self.deployment.gpus


@dataclass(frozen=True)
class SearchResult:
    point: WorkloadPoint
    slos: tuple[SLO, ...]
    budget: int
    shape: NodeShape
    candidates: tuple[Candidate, ...]  # ranked: SLO met first, then goodput per GPU
    evaluated: int
    bootstrap_sets: int
    level: float
    refined: int = 0


def _rank_key(c: Candidate) -> tuple:
    return (not c.meets_slo, -c.goodput_per_gpu, c.deployment.gpus, c.deployment.name)


def search(profile: Profile, point: WorkloadPoint, slos: Sequence[SLO], *, budget: int, shape: NodeShape,
           tps: Iterable[int] = (1, 2, 4, 8), kinds: Iterable[str] = ("collocated", "pd"), min_gpus: int = 1,
           refine: int = 20, level: float = 0.9) -> SearchResult:
    """Rank every feasible layout; the ``refine`` leading ones get bootstrap probabilities."""
    deployments = enumerate_deployments(budget, shape, tps=tps, kinds=kinds, min_gpus=min_gpus)
    cands = []
    for dep in deployments:
        pred = predict(profile, dep, point)
        values = {s.key: _slo_value(pred, s) for s in slos}
        cands.append(Candidate(deployment=dep, prediction=pred, slo_values=values, meets_slo=meets(pred, slos),
                               goodput_tok_s=goodput_tok_s(pred, slos),
                               extrapolations=extrapolations(profile, dep, point)))
    cands.sort(key=_rank_key)
    boot = profile.calibration.bootstrap if profile.calibration else []
    head = cands[:refine]
    if boot and head:
        good = np.zeros((len(head), len(boot)))
        ok = np.zeros((len(head), len(boot)), dtype=bool)
        for i, c in enumerate(head):
            for b, params in enumerate(boot):
                try:
                    p = predict(params, c.deployment, point)
                    ok[i, b] = meets(p, slos)
                    good[i, b] = goodput_tok_s(p, slos) / c.deployment.gpus
                except (ValueError, ZeroDivisionError, OverflowError):
                    ok[i, b], good[i, b] = False, 0.0
        score = np.where(ok, good, -1.0)
        best = np.argmax(score, axis=0)
        any_ok = ok.any(axis=0)
        q = ((1 - level) / 2, (1 + level) / 2)
        refined = []
        for i, c in enumerate(head):
            lo, hi = np.quantile(good[i], q)
            lo, hi = min(float(lo), c.goodput_per_gpu), max(float(hi), c.goodput_per_gpu)  # holds the estimate
            p_best = float(np.mean((best == i) & any_ok))
            refined.append(Candidate(**{**c.__dict__, "p_slo": float(ok[i].mean()),
                                        "goodput_per_gpu_interval": (lo, hi), "p_best": p_best}))
        cands = refined + cands[refine:]
    return SearchResult(point=point, slos=tuple(slos), budget=budget, shape=shape, candidates=tuple(cands),
                        evaluated=len(deployments), bootstrap_sets=len(boot), level=level,
                        refined=min(refine, len(cands)) if boot else 0)


def format_table(result: SearchResult, *, top: int = 15, title: str = "") -> str:
    """The ranked table as text."""
    slo_text = ", ".join(str(s) for s in result.slos) or "none"
    pt = result.point
    load = "steady state" if pt.requests_per_slot is None else f"{pt.requests_per_slot} requests per slot"
    lines = [title or (f"{pt.label} (ISL {pt.isl} / OSL {pt.osl}, {load}), SLO {slo_text}, budget {result.budget} "
                       f"GPUs on {result.shape.nodes} node(s) x {result.shape.gpus_per_node}: "
                       f"{result.evaluated} layouts")]
    met = sum(1 for c in result.candidates if c.meets_slo)
    lines.append(f"  {met} of {result.evaluated} meet the SLO (point estimate); P(SLO), P(best) over "
                 f"{result.bootstrap_sets} bootstrap parameter sets for the leading {result.refined}; "
                 f"goodput/GPU interval {result.level:.0%}")
    keys = [s.key for s in result.slos]
    head = f"  {'#':>2} {'layout':<24} {'GPUs':>4} {'goodput/GPU':>11} {'interval':>15} {'P(SLO)':>6} {'P(best)':>7} " \
           + " ".join(f"{k:>14}" for k in keys) + f" {'tok/s':>7} {'bottleneck':<11} notes"
    lines.append(head)
    for i, c in enumerate(result.candidates[:top], start=1):
        iv = c.goodput_per_gpu_interval
        ivs = f"{iv[0]:6.0f}-{iv[1]:<6.0f}" if iv else "-"
        ps = f"{c.p_slo:.2f}" if c.p_slo is not None else "-"
        pb = f"{c.p_best:.2f}" if c.p_best is not None else "-"
        vals = " ".join(f"{c.slo_values[k]:>13.1f}{'' if c.slo_values[k] <= s.bound else '!'}"
                        for k, s in zip(keys, result.slos))
        name = f"{c.deployment.label} {c.deployment.placement}" if c.deployment.kind == "pd" else c.deployment.label
        notes = "; ".join(c.extrapolations)
        lines.append(f"  {i:>2} {name:<24} {c.deployment.gpus:>4} {c.goodput_per_gpu:>11.0f} {ivs:>15} {ps:>6} "
                     f"{pb:>7} {vals} {c.prediction.out_tok_s:>7.0f} {c.prediction.bottleneck:<11} {notes}")
    lines.append("  ('!' marks a predicted percentile over its bound)")
    return "\n".join(lines)


def topology_yaml(dep: Deployment, *, model: str, description: str, max_model_len: int = 16000,
                  ingress_replicas: int = 16) -> dict:
    """A topologies/*.yaml document for ``dep`` (validated by pdperf.specs when written)."""
    doc: dict = {"name": dep.name, "description": description, "kind": dep.kind}
    if dep.kind == "collocated":
        doc["collocated"] = {"replicas": dep.prefill_replicas, "tp": dep.prefill_tp}
    else:
        doc["prefill"] = {"replicas": dep.prefill_replicas, "tp": dep.prefill_tp}
        doc["decode"] = {"replicas": dep.decode_replicas, "tp": dep.decode_tp}
        doc["placement"] = dep.placement
    doc.update({"ingress_replicas": ingress_replicas, "tags": ["planner"], "device": "gpu", "model": model,
                "max_model_len": max_model_len})
    return doc


def write_topologies(result: SearchResult, directory: Path, *, model: str, count: int = 5,
                     max_model_len: int = 16000) -> list[Path]:
    """The ``count`` best layouts that meet the SLO as topology files in ``directory``, each validated."""
    from pdperf.errors import SpecError
    from pdperf.specs import load_topology

    directory = Path(directory)
    written = []
    for c in [c for c in result.candidates if c.meets_slo][:count]:
        pt = result.point
        desc = (f"Planner candidate for {pt.label} ISL {pt.isl}/OSL {pt.osl} under "
                f"{', '.join(str(s) for s in result.slos)}: predicted {c.goodput_per_gpu:.0f} goodput tok/s per GPU, "
                f"{c.prediction.out_tok_s:.0f} tok/s ({c.deployment.gpus} GPUs).")
        path = directory / f"{c.deployment.name}.yaml"
        atomic_write_text(path, yaml.safe_dump(topology_yaml(c.deployment, model=model, description=desc,
                                                             max_model_len=max_model_len), sort_keys=False))
        try:
            load_topology(path)
        except SpecError as e:
            path.unlink(missing_ok=True)
            raise PlannerError(f"{path}: the written topology does not validate ({e}); report this as a bug") from None
        written.append(path)
    return written
