#!/usr/bin/env bash
# One lent GPU (H200), production-mode engines (torch.compile + CUDA graphs, vLLM's defaults):
# does this suite's client change the server, and what do the suite's own runs record?
#   tools/gpu-testmachines/fidelity-session.sh servers  two `vllm serve` of the Llama-3.1-8B shapes (dummy weights), started
#                                    together in sessions of their own (they outlive the call), 0.42 of the
#                                    GPU's memory each: "short" keeps the trained 8192-token tokenizer (ids
#                                    without text: the detokenizer's slow path), "padded" is what
#                                    pdperf/models.py builds now. Then benchmarks/side_by_side.py at c64: the
#                                    request options one at a time on "short", then on "padded"; then the
#                                    standing side-by-side (this client vs vllm bench serve) on "padded".
#   tools/gpu-testmachines/fidelity-session.sh more     more standing rounds on the kept "padded" server (c1/c16/c64), then both stop
#   tools/gpu-testmachines/fidelity-session.sh standing one "padded" server alone, the standing side-by-side at c1/c16/c64: this
#                                    client, vllm bench serve with a fresh seed per run, and with one seed for
#                                    every run (its prompts repeat: the prefix cache serves them), then it stops
#   tools/gpu-testmachines/fidelity-session.sh record   the suite: colloc-1xtp1 through plain vLLM (--backend vllm) and through
#                                    Ray Serve LLM (RECORD="ray vllm" for the other order), sweep recorded as this GPU's baselines
#   tools/gpu-testmachines/fidelity-session.sh rerun    the same two on fresh deployments, gated against those baselines
#   tools/gpu-testmachines/fidelity-session.sh knobs    Ray colloc-1xtp1 at c16/c64 with stream batching 50 ms (Ray's cost at c64)
# Results go to $OUT (the device tool brings them back); baselines live in $STATE across calls.
# Every step stops starting work CALL_LIMIT_S (default 570) after it began. Rehearse on CPU with
#   MODEL=tiny-llama VOCAB=128256 ISL=128 OSL=32 SERVER_ARGS='--enforce-eager --dtype float32' \
#   PY=.venv/bin/python OUT=/tmp/o STATE=/tmp/s tools/gpu-testmachines/fidelity-session.sh servers
set -uo pipefail
cd "$(dirname "$0")/../.."
step=${1:?usage: tools/gpu-testmachines/fidelity-session.sh servers|standing|more|record|rerun|knobs}
PY=${PY:-python3}
VLLM=$(dirname "$(command -v "$PY")")/vllm
STATE=${STATE:-/tmp/pdperf-fidelity}
OUT=${OUT:-$STATE/out}
CALL_LIMIT_S=${CALL_LIMIT_S:-570}
MODEL=${MODEL:-llama-3.1-8b}
ISL=${ISL:-1024} OSL=${OSL:-256}
read -r -a SERVER_ARGS <<<"${SERVER_ARGS:---gpu-memory-utilization 0.42 --max-model-len 4096}"
VOCAB_ARGS=(); [ -n "${VOCAB:-}" ] && VOCAB_ARGS=(--vocab "$VOCAB")
mkdir -p "$STATE" "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
# the lent machines' rule: never NVLink multicast (tools/gpu-testmachines/testmachine.sh says why)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-/tmp/vllm-cache}
[ -z "${PDPERF_GIT_SHA:-}" ] && [ -s /tmp/w/pdperf-git-sha ] && export PDPERF_GIT_SHA=$(cat /tmp/w/pdperf-git-sha)
log() { echo "[fidelity $step +${SECONDS}s] $*" | tee -a "$OUT/fidelity.log"; }
left() { echo $(( CALL_LIMIT_S - SECONDS )); }

start_server() {  # $1 = name, $2 = model folder: vllm serve in a session of its own, its port in $STATE/$1.port
  local port
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  setsid "$VLLM" serve "$2" --host 127.0.0.1 --port "$port" --served-model-name llama --load-format dummy \
    "${SERVER_ARGS[@]}" >"$STATE/$1.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$1.pid"; echo "$port" >"$STATE/$1.port"
  log "$1: vllm serve $2 on port $port (pid $(cat "$STATE/$1.pid"))"
}

await_servers() {  # every named server healthy, or one died / the deadline passed
  "$PY" - "$STATE" "$(( $(left) - 60 ))" "$@" <<'PY'
import os, sys, time, urllib.request
state, budget, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
t0, ready = time.monotonic(), set()
while len(ready) < len(names):
    for n in names:
        if n in ready:
            continue
        pid = int(open(f"{state}/{n}.pid").read())
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"{n}: vllm serve exited before it was ready; its log:\n" + open(f"{state}/{n}.log").read()[-3000:])
        try:
            port = open(f"{state}/{n}.port").read().strip()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    ready.add(n)
                    print(f"{n}: ready after {time.monotonic() - t0:.0f} s", flush=True)
        except OSError:
            pass  # not listening yet
    if time.monotonic() - t0 > budget:
        sys.exit(f"servers {sorted(set(names) - ready)} not ready within {budget:.0f} s")
    time.sleep(1)  # poll interval (the deadline above bounds the wait)
PY
}

sbs() {  # $1 = server name, $2 = json name, then side_by_side arguments
  local name=$1 out=$2; shift 2
  local port pid budget
  port=$(cat "$STATE/$name.port"); pid=$(cat "$STATE/$name.pid")
  budget=$(( $(left) - 20 ))
  if [ "$budget" -lt 40 ]; then log "$out: skipped, $(left) s left"; return 0; fi
  log "$out on $name: $*"
  "$PY" benchmarks/side_by_side.py --url "http://127.0.0.1:$port" --metrics-url "http://127.0.0.1:$port/metrics" \
    --server-pid "$pid" --served-name llama --model "$MODEL" "${VOCAB_ARGS[@]}" --isl "$ISL" --osl "$OSL" \
    --deadline-s "$budget" --json "$OUT/$out.json" "$@" 2>&1 | grep -v '^{' | tee -a "$OUT/$out.txt"
}

stop_servers() {
  for n in short padded; do
    [ -s "$STATE/$n.pid" ] && kill -- -"$(cat "$STATE/$n.pid")" 2>/dev/null
  done
  pkill -f 'vllm serve' 2>/dev/null; pkill -9 -f '^VLLM::' 2>/dev/null
  rm -f "$STATE"/*.pid
}

engine_facts() {  # start-up facts from each server's log: mode, compile and graph capture, ready time
  for n in short padded; do
    [ -f "$STATE/$n.log" ] || continue
    grep -hE "torch.compile takes|Graph capturing finished|init engine|Compil|enforce_eager|Starting vLLM API server|Available KV cache" \
      "$STATE/$n.log" | head -12 | sed "s/^/    $n: /" | tee -a "$OUT/fidelity.log"
    cp "$STATE/$n.log" "$OUT/server-$n.log"
  done
}

suite() {  # $1 = log name, then pytest arguments: through testmachine.sh, baselines in $STATE
  local name=$1; shift
  local budget=$(( $(left) - 40 ))
  if [ "$budget" -lt 120 ]; then log "$name: skipped, $(left) s left"; return 0; fi
  [ -d "$STATE/baselines" ] || cp -r baselines "$STATE/baselines"
  log "$name (budget ${budget}s): $*"
  PDPERF_CALL_BUDGET_S=$budget OUT=$OUT tools/gpu-testmachines/testmachine.sh -m sweep --topology colloc-1xtp1 \
    --workload gpu-small-isl1024-osl256 --model "$MODEL" --baselines-dir="$STATE/baselines" "$@" >"$OUT/$name.log" 2>&1
  log "$name: exit $?; $(grep -E '^=+ .*(passed|failed|error|skipped|no tests).* =+$' "$OUT/$name.log" | tail -1)"
  grep -E 'ready after|DeployError|pytest stopped after|PASSED|FAILED|SKIPPED' "$OUT/$name.log" | head -12 | sed 's/^/    /' \
    | tee -a "$OUT/fidelity.log"
}

nvidia-smi -L 2>/dev/null | tee -a "$OUT/fidelity.log"
case $step in
servers)
  "$PY" -m pdperf.models "$MODEL" >/dev/null || exit 1
  "$PY" benchmarks/side_by_side.py --model "$MODEL" "${VOCAB_ARGS[@]}" --prepare "$STATE/models" >"$STATE/models.txt" || exit 1
  short=$(sed -n 1p "$STATE/models.txt") padded=$(sed -n 2p "$STATE/models.txt")
  stop_servers
  start_server short "$short"
  sleep 5  # stagger the two compiles a little (both JIT the same FlashInfer kernels)
  start_server padded "$padded"
  await_servers short padded 2>&1 | tee -a "$OUT/fidelity.log" || { engine_facts; stop_servers; exit 1; }
  engine_facts
  # one factor at a time at c64, where the gap was largest: the request options on the short tokenizer ...
  sbs short ab-short --short-tokenizer --concurrency 64 --requests-per-concurrency 4 --rounds 1 --warmup-requests 64 \
    --variants pdperf_old,bench,pdperf_t0,pdperf,bench_t0
  # ... and on the padded one (the fix of the model: greedy costs the server nothing more there)
  sbs padded ab-padded --concurrency 64 --requests-per-concurrency 4 --rounds 1 --warmup-requests 64 \
    --variants pdperf_t0,bench_t0,pdperf,bench
  sbs padded standing-1 --concurrency 1 16 64 --requests-per-concurrency 4 --min-requests 16 --rounds 3 \
    --warmup-requests 0 --variants pdperf,bench
  ;;
standing)
  "$PY" -m pdperf.models "$MODEL" >/dev/null || exit 1
  "$PY" benchmarks/side_by_side.py --model "$MODEL" "${VOCAB_ARGS[@]}" --prepare "$STATE/models" >"$STATE/models.txt" || exit 1
  stop_servers
  start_server padded "$(sed -n 2p "$STATE/models.txt")"
  await_servers padded 2>&1 | tee -a "$OUT/fidelity.log" || { engine_facts; stop_servers; exit 1; }
  engine_facts
  sbs padded standing-4 --concurrency 1 16 64 --requests-per-concurrency 4 --min-requests 16 --rounds 3 \
    --warmup-requests 0 --variants pdperf,bench,bench_sameseed
  stop_servers
  ;;
more)
  [ -s "$STATE/padded.pid" ] || { log "no kept server (the 'servers' step did not run on this machine)"; exit 1; }
  sbs padded standing-2 --concurrency 1 16 64 --requests-per-concurrency 4 --min-requests 16 --rounds 3 \
    --warmup-requests 0 --variants bench,pdperf
  stop_servers
  ;;
record)  # RECORD names the backends in the order they record (a short call still gets the first)
  stop_servers
  for b in ${RECORD:-vllm ray}; do
    # gated where a band exists, recorded where none does: `pdperf baseline add-run` adds the
    # gated runs to the committed bands afterwards (--update-baselines would replace the bands)
    if [ "$b" = vllm ]; then suite vllm-record --backend vllm --record-missing-baselines --deploy-timeout 400
    else suite ray-record --record-missing-baselines --deploy-timeout 400; tools/gpu-testmachines/testmachine.sh --stop; fi
  done
  ;;
knobs)  # Ray's cost at c16/c64 with Ray Serve LLM's stream batching on (50 ms, Ray's own default), recorded apart
  stop_servers
  suite ray-batch50 -k "c16 or c64" --stream-batching-ms 50 --record-missing-baselines \
    --baselines-dir="$STATE/knobs-baselines" --deploy-timeout 400
  ;;
rerun)
  suite ray-rerun --deploy-timeout 400
  tools/gpu-testmachines/testmachine.sh --stop
  suite vllm-rerun --backend vllm --deploy-timeout 400
  ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
tar czf "$OUT/baselines.tgz" -C "$STATE" baselines 2>/dev/null
log "done"
