"""A test session in three stages, each a typed boundary tested without a cluster.

- ``options``: what the user asked for (pytest options, the CLI, a few environment switches),
  checked once (``SessionOptions``), and the spec files it names (``load_specs``);
- ``plan``: what runs, what is skipped and why, sweep cases, greedy references, deployment
  groups, the order of tests (``SessionPlan``), a pure function of options, specs and nodes;
- ``runtime``: what has a lifetime: the Ray connection, the deployment pool, the GPU ledger
  (``SessionRuntime``), owned by the session fixtures in ``fixtures/session.py``.
"""

from pdperf.session.options import EnvSwitches, SessionOptions, SpecSet, load_specs
from pdperf.session.plan import SessionPlan, Skip, SweepCase, grouped_order, make_plan
from pdperf.session.runtime import SessionRuntime, local_nodes

__all__ = ["EnvSwitches", "SessionOptions", "SpecSet", "load_specs", "Skip", "SessionPlan", "SweepCase",
           "grouped_order", "make_plan", "SessionRuntime", "local_nodes"]
