#!/usr/bin/env bash
# The smoke tier through the suite's two other backends on the embedded CPU stack:
#   1. plain `vllm serve` processes + the small PD proxy (the no-Ray reference backend);
#   2. an external URL: a server started by `pdperf serve`, measured with --backend external.
# Not in CI yet: on 2 cores the no-Ray PD path decodes at ~1.5 tokens/s (KV leases expire
# before the decode engine pulls them), so step 1 takes many minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh cpu
py=.venv/bin/python
status=0
echo "== 1/2 smoke (backend vllm: no Ray)"
$py -m pytest -m smoke --backend vllm "$@" || status=$?

echo "== 2/2 smoke (backend external: a URL served by 'pdperf serve')"
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
