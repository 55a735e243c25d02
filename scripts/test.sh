#!/usr/bin/env bash
# Sets up the embedded CPU stack and runs the suite's tests on it (what CI runs):
#   1. the harness's own tests and the smoke tier through Ray Serve LLM (both CPU topologies up);
#   2. the CPU sweeps, gated against the committed CPU baselines, one topology up at a time
#      (--max-alive 1): on 2 cores an idle PD engine's NIXL progress thread spins a core and
#      would be measured as part of every other topology's latency;
#   3. the smoke tier through plain `vllm serve` processes (the no-Ray reference backend);
#   4. the smoke tier against an external URL (a server started by `pdperf serve`).
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

echo "== 1/4 selftest + smoke (backend ray)"
$py -m pytest -m "selftest or smoke" "$@" || status=$?

echo "== 2/4 sweeps gated against baselines/ (backend ray, one topology at a time)"
$py -m pytest -m sweep --max-alive 1 "$@" || status=$?

echo "== 3/4 smoke (backend vllm: no Ray)"
$py -m pytest -m smoke --backend vllm "$@" || status=$?

echo "== 4/4 smoke (backend external: a URL served by 'pdperf serve')"
info=$(mktemp)
setsid .venv/bin/pdperf serve cpu-colloc-1xtp1 --backend vllm >"$info" 2>"$info.err" &
serve_pid=$!
cleanup() { kill -TERM -- -"$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; rm -f "$info" "$info.err"; }
trap cleanup EXIT
url=$($py - "$info" "$serve_pid" <<'PY'
import json, os, sys
from pdperf.waiting import poll_until
path, pid = sys.argv[1], int(sys.argv[2])
def ready():
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise SystemExit("pdperf serve exited before serving; see its log above")
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    return json.loads(lines[0])["url"] if lines else None
print(poll_until(ready, what="pdperf serve to print its URL", timeout_s=900, interval_s=1))
PY
) || { cat "$info.err" >&2; exit 1; }
$py -m pytest -m smoke --backend external --external-url "$url" --tokenizer tiny-llama "$@" || status=$?
exit $status
