"""Resolved service times: what one engine of one role costs, in seconds, at one TP.

The analytic model (:mod:`pdperf.planner.model`) and the discrete-event simulator
(:mod:`pdperf.planner.simulate`) read the same :class:`SystemCosts`, so a test that runs
both on one ``SystemCosts`` checks the queueing mathematics alone: any difference between
them is the analytic approximation, not two different ideas of what an engine costs.
A profile (:mod:`pdperf.planner.profiles`) turns into ``SystemCosts`` for one deployment
through :func:`pdperf.planner.profiles.resolve`.

The engine these costs describe is vLLM-like:

- prefill of one request: ``prefill_s_per_request + prefill_s_per_token * ISL`` (cost linear in
  prompt tokens; attention's quadratic term is inside the per-token slope at the calibrated ISL);
- one decode step over a batch: ``step_s + sum over running sequences of
  (per_seq_s + per_seq_s_per_token * context tokens)`` (fixed weight reads plus per-sequence
  work that grows with the KV it reads);
- a collocated engine mixes both in one step (chunked prefill): the step holds every running
  sequence's decode token plus up to ``chunk_tokens - batch`` prompt tokens, and costs the sum;
- an engine admits a request only while the context tokens it holds plus the new prompt fit
  ``kv_capacity_tokens``; while a request waits for room, every step costs
  ``saturation_penalty`` times more (vLLM preempts and recomputes when its KV cache is full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RoleCosts:
    """One role's engines: how many, and what each one's work costs (seconds)."""

    engines: int
    tp: int
    prefill_s_per_token: float
    prefill_s_per_request: float
    chunk_tokens: int
    step_s: float
    per_seq_s: float
    per_seq_s_per_token: float
    kv_capacity_tokens: float = math.inf
    saturation_penalty: float = 1.0

    def prefill_s(self, isl: int) -> float:
        return self.prefill_s_per_request + self.prefill_s_per_token * isl

    def per_seq_at(self, context_tokens: float) -> float:
        """Decode cost one running sequence adds to a step, at a context of ``context_tokens``."""
        return self.per_seq_s + self.per_seq_s_per_token * context_tokens

    def step(self, batch: float, mean_context: float) -> float:
        """One decode step over ``batch`` sequences whose mean context is ``mean_context`` tokens."""
        return self.step_s + batch * self.per_seq_at(mean_context)


@dataclass(frozen=True, slots=True)
class SystemCosts:
    """A whole deployment's costs: collocated engines, or prefill + KV transfer + decode.

    ``overhead_s`` is a fixed delay every request pays before its first token outside the
    engines (client, ingress, router, tokenizer; for PD also the extra hop), ``jitter_s`` the
    mean of an exponential random delay on top: the variability that makes requests queue.
    ``convoy`` (0..1) is read by the analytic model only: how far a collocated engine's
    closed loop moves in step (the simulator produces its own synchronisation).
    """

    kind: Literal["collocated", "pd"]
    prefill: RoleCosts  # the collocated engines when kind == "collocated"
    decode: RoleCosts | None
    kv_s_per_token: float = 0.0
    kv_latency_s: float = 0.0
    overhead_s: float = 0.0
    jitter_s: float = 0.0
    convoy: float = 0.0

    def kv_transfer_s(self, isl: int) -> float:
        if self.kind != "pd":
            return 0.0
        return self.kv_latency_s + self.kv_s_per_token * isl

    @property
    def gpus(self) -> int:
        n = self.prefill.engines * self.prefill.tp
        if self.decode is not None:
            n += self.decode.engines * self.decode.tp
        return n
