#!/usr/bin/env bash
# One GPU test-machine session of issue 7 as device calls of under 600 s each (4 GPUs, eager engines).
# One topology per step, nothing else up while it is measured (session 4 measured colloc-2xtp1
# beside an idle PD app: ITL x1.8 at c1 against session 3's alone, cause unproven):
#   scripts/gpu-session.sh 1   Ray PD 1P1D: smoke (all but the greedy check) + sweep, recording baselines, kept up
#   scripts/gpu-session.sh 2   Ray PD: the sweep again, gated against those baselines (adopting the kept
#                              application, or deploying it again); then the greedy check beside its
#                              1-GPU collocated reference
#   scripts/gpu-session.sh 3   Ray colloc-2xtp1 alone: smoke + sweep, recording baselines, kept up
#   scripts/gpu-session.sh 4   Ray colloc-2xtp1: the sweep again, gated
#   scripts/gpu-session.sh 5   Ray colloc-1xtp2 (TP2): smoke + sweep recorded, then gated as far as time goes
#   scripts/gpu-session.sh 6   no Ray (vllm backend): colloc-2xtp1's sweep gated against the committed
#                              baselines (baselines/h100-x4/.../*.vllm.json)
#   scripts/gpu-session.sh 7   Ray PD alone on a fresh head: the sweep from c4 up gated against the
#                              committed baselines (c1's 16 sequential requests take ~2 min)
#   scripts/gpu-session.sh 8   the same for colloc-2xtp1: 7 + 8 compare PD and collocated within one
#                              session (pdperf compare of their run folders)
#   scripts/gpu-session.sh 9   the same for colloc-1xtp2 (TP2's gated rerun)
#   scripts/gpu-session.sh 10  Ray colloc-2xtp2 (4 GPUs) alone: the sweep from c4, recording baselines
#   scripts/gpu-session.sh 11  Ray PD 1P-TP2:1D-TP2 (pd-1p2-1d2-pack, 4 GPUs) the same: 10 + 11 are the
#                              issue's 4-GPU comparison at equal GPU count
#   TARGET=T POINTS='c16 or c64' scripts/gpu-session.sh 12   the sweep of T's kept application (an
#                              earlier step left it up; otherwise T alone on a fresh head), only those
#                              points, gated: a PD start-up of ~310 s leaves only c4 in one call
#   scripts/gpu-session.sh 13  the greedy check alone: PD 1P1D and its collocated TP1 reference, fresh head
#   (7-9: FIRST_POINT=none keeps c1; the gate judges a point against its baseline's band of runs)
# A gated step also records the points the recording step did not reach (--record-missing-baselines).
# Measured on 4x H100, eager: a Ray start-up 150-320 s (a replica restart costs ~150 s), smoke ~60 s,
# the sweep 260-300 s (c1 alone 106-133 s: 20 sequential requests of 256 tokens).
# The calls go out together (a machine idle for 30 s is given back), so each step reads what the
# earlier ones left in $STATE and chooses its work from it. Every pytest run goes through
# scripts/gpu-testmachine.sh (the no-multicast settings, the SIGINT budget, the diagnosis).
# Each step leaves one archive, $OUT/step<N>.tgz (logs, run folders, diagnoses, baselines), and
# prints a summary. Names can be changed for a rehearsal on the CPU stack, e.g.
#   T_COLLOC=cpu-colloc-1xtp1 T_PD=cpu-pd-1p1-1d1 T_TP2=cpu-colloc-1xtp1 WORKLOAD=cpu-latency \
#   MODEL_ARGS= ENGINE_ARGS= EXTRA_ARGS='--requests-scale 0.3' CALL_LIMIT_S=1500 \
#   PDPERF_PYTHON=.venv/bin/python OUT=/tmp/o STATE=/tmp/s scripts/gpu-session.sh 1
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: scripts/gpu-session.sh 1..13}
T_COLLOC=${T_COLLOC:-colloc-2xtp1} T_PD=${T_PD:-pd-1p1-1d1-pack} T_TP2=${T_TP2:-colloc-1xtp2}
T_COLLOC4=${T_COLLOC4:-colloc-2xtp2} T_PD4=${T_PD4:-pd-1p2-1d2-pack}  # the 4-GPU pair: 2xTP2 vs 1P-TP2:1D-TP2
WORKLOAD=${WORKLOAD:-gpu-small-isl1024-osl256}
read -r -a MODEL <<<"${MODEL_ARGS---model llama-3.1-8b}"
# Eager engines (no torch.compile, no CUDA graphs): a Ray start-up in about two minutes instead of
# four or more (measured on 4x H100), the only way three topologies fit 30 minutes of device time.
# Numbers are eager numbers: they compare topologies and paths, not the model's production speed.
read -r -a ENGINE <<<"${ENGINE_ARGS---engine-arg enforce_eager=true}"
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"  # more pytest arguments for every run (a rehearsal: --requests-scale 0.2)
CALL_LIMIT_S=${CALL_LIMIT_S:-585}  # the device tool kills a call at 600 s
# The session's device time runs out before a late call's 600 s: with DEVICE_BUDGET_S (seconds lent
# to the session) and a start stamp (epoch seconds, written by the session's first call into
# $SESSION_T0_FILE), a call ends its work in time to write its archive instead of being killed.
SESSION_T0_FILE=${SESSION_T0_FILE:-/tmp/pdperf-session-t0}
if [ -n "${DEVICE_BUDGET_S:-}" ] && [ -s "$SESSION_T0_FILE" ]; then
  device_left=$(( DEVICE_BUDGET_S - ($(date +%s) - $(cat "$SESSION_T0_FILE")) - ${DEVICE_MARGIN_S:-45} ))
  [ "$device_left" -lt "$CALL_LIMIT_S" ] && CALL_LIMIT_S=$device_left
fi
# the commit these calls carry, written here by scripts/gpu-rechunk.py (the device's .git lags the tree)
[ -z "${PDPERF_GIT_SHA:-}" ] && [ -s /tmp/w/pdperf-git-sha ] && export PDPERF_GIT_SHA=$(cat /tmp/w/pdperf-git-sha)
# staged chunks but no finished install (scripts/gpu-install.sh): every pytest run would fail on an import
if [ -d /tmp/w ] && [ ! -e /tmp/w/pdperf-installed ] && [ -z "${PDPERF_PYTHON:-}" ]; then
  echo "gpu-session $step: the stack in /tmp/w is not installed (scripts/gpu-install.sh did not finish: a chunk" \
       "missing, or it was not run): nothing to do" >&2
  exit 3
fi
STATE=${STATE:-/tmp/pdperf-gpu-state}
mkdir -p "$STATE"
FINAL_OUT=${OUT:-reports}
export OUT=$STATE/out-$step PDPERF_DIAG_TIMEOUT_S=${PDPERF_DIAG_TIMEOUT_S:-45}
rm -rf "$OUT"; mkdir -p "$OUT"
# Baselines live in $STATE, not in the working tree the device tool re-copies on every call; they
# come back in each step's archive (baselines/<hardware_id>/...) to be committed from there.
[ -d "$STATE/baselines" ] || cp -r baselines "$STATE/baselines"
log() { echo "[gpu-session $step +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

# pytest through the test-machine script with what is left of this call (less a reserve for the
# diagnosis and the archive); $1 = a name for the log, $2 = the most seconds this run may take.
suite() {
  local name=$1 want=$2; shift 2
  local left=$(( CALL_LIMIT_S - SECONDS - 60 ))
  local budget=$(( want < left ? want : left ))
  if [ "$budget" -lt 60 ]; then log "$name: skipped, $left s left in this call"; return 99; fi
  log "$name: budget ${budget}s: $*"
  PDPERF_CALL_BUDGET_S=$budget scripts/gpu-testmachine.sh "$@" "${EXTRA[@]}" --baselines-dir="$STATE/baselines" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc; $(grep -E '^=+ .*(passed|failed|error|skipped|no tests).* =+$' "$OUT/$name.log" | tail -1)"
  grep -E 'ready after|DeployError|pytest stopped after' "$OUT/$name.log" | head -8 | sed 's/^/    /' | tee -a "$OUT/session.log"
  return $rc
}

# Applications Serve reports RUNNING, space-separated ("" when there is no Ray head).
running_apps() {
  pgrep -x raylet >/dev/null || { log "no Ray head is running" >&2; return 0; }
  timeout 60 "${PDPERF_PYTHON:-python3}" - <<'PY' 2>/dev/null
import ray
from ray import serve
ray.init(address="auto", log_to_driver=False, configure_logging=False)
print(" ".join(n for n, a in serve.status().applications.items() if str(a.status).endswith("RUNNING")))
PY
}

finish() {
  # each replica's torch.distributed port choice (pdperf/backends/ray_replica.py), from Ray's worker logs
  grep -h "store scan starts" /tmp/ray/session_latest/logs/worker-*.out 2>/dev/null | sort -u | tail -n 8 \
    | sed 's/^/    replica: /' | tee -a "$OUT/session.log"
  log "done (call limit ${CALL_LIMIT_S}s)"
  cp "$OUT/session.log" "$STATE/step$step-session.log"
  mkdir -p "$FINAL_OUT"
  rm -f "$OUT"/*-baselines.tgz  # gpu-testmachine.sh's copy of the repo's baselines: the real ones are these
  cp -r "$STATE/baselines" "$OUT/baselines"
  tar czf "$FINAL_OUT/step$step.tgz" -C "$OUT" . 2>/dev/null
  for f in "$OUT"/*.log; do
    [ "$(basename "$f")" = session.log ] && continue
    echo "---- $(basename "$f"): last lines"
    grep -vE '^\s*$' "$f" | tail -n 15
  done
  echo "---- session"
  cat "$STATE"/step*-session.log
}
trap finish EXIT

# The per-replica port choice wraps Ray Serve LLM's server classes (pdperf/backends/ray_replica.py),
# first seen on CPU with Ray 2.60: should Ray 2.58 reject them, the later steps deploy Ray's own.
if [ -f "$STATE/no-wrap" ]; then export PDPERF_WRAP_RAY_SERVERS=0; log "Ray's own server classes (an earlier step: $(cat "$STATE/no-wrap"))"; fi
common=(--workload "$WORKLOAD" "${MODEL[@]}" "${ENGINE[@]}" --keep-deployments)
record() {  # $1 = log name, $2 = topology: smoke (no greedy check) + sweep, baselines written; more pytest args after
  local name=$1 topo=$2; shift 2
  suite "$name" 520 -m "${MARKS:-smoke or sweep}" -k "not greedy" --topology "$topo" "${common[@]}" --update-baselines \
    --deploy-timeout "${DEPLOY_TIMEOUT_S:-360}" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ] && grep -qE 'DeployError|failed to deploy' "$OUT/$name.log" && grep -q 'ray_replica' "$OUT/$name.log"; then
    echo "$name failed to deploy with the wrapped server classes" >"$STATE/no-wrap"
    log "the wrapped server classes failed to deploy: later steps use Ray's own (PDPERF_WRAP_RAY_SERVERS=0)"
  fi
  log "running after $name: [$(running_apps | tee "$STATE/running")]"
}
case $step in
1)
  scripts/gpu-testmachine.sh --stop
  record ray-pd-record "$T_PD"
  ;;
2)
  log "running: [$(running_apps)] (the last step left: [$(cat "$STATE/running" 2>/dev/null)])"
  suite ray-pd-gate 360 -m sweep --topology "$T_PD" "${common[@]}" --deploy-timeout 300 --record-missing-baselines
  suite ray-greedy 200 -m smoke -k greedy --topology "$T_PD" "${common[@]}" --deploy-timeout 180
  ;;
3)
  scripts/gpu-testmachine.sh --stop
  record ray-colloc-record "$T_COLLOC"
  ;;
4)
  log "running: [$(running_apps)] (the last step left: [$(cat "$STATE/running" 2>/dev/null)])"
  suite ray-colloc-gate 520 -m sweep --topology "$T_COLLOC" "${common[@]}" --deploy-timeout 300 \
    --record-missing-baselines
  ;;
5)
  scripts/gpu-testmachine.sh --stop
  suite ray-tp2-record 380 -m "smoke or sweep" -k "not greedy" --topology "$T_TP2" "${common[@]}" \
    --update-baselines --deploy-timeout 300
  case " $(running_apps) " in *" $T_TP2 "*) ;; *) log "$T_TP2 is not running: no gated rerun"; exit 0 ;; esac
  suite ray-tp2-gate 300 -m sweep --topology "$T_TP2" "${common[@]}" --record-missing-baselines
  ;;
6)
  scripts/gpu-testmachine.sh --stop
  suite vllm-gate 520 -m sweep --backend vllm --topology "$T_COLLOC" --workload "$WORKLOAD" "${MODEL[@]}" \
    "${ENGINE[@]}" --deploy-timeout 200
  ;;
7|8|9)
  case $step in 7) target=$T_PD ;; 8) target=$T_COLLOC ;; 9) target=$T_TP2 ;; esac
  scripts/gpu-testmachine.sh --stop
  # c1 (16 sequential requests, ~2 min) left out: a start-up of 3-5 min and c4-c64 fill the call
  first="tests/sweeps/test_sweeps.py::test_point[$target/$WORKLOAD/${FIRST_POINT:-c1}]"
  log "gated alone: $target, without $first"
  suite "ray-alone-$target" 520 -m sweep --topology "$target" "${common[@]}" --deploy-timeout 360 \
    --record-missing-baselines --deselect "$first"
  ;;
12)
  # the kept application of an earlier step (adopted, no start-up), only the points named in POINTS
  target=${TARGET:?step 12 needs TARGET=<topology> (and POINTS, a -k expression such as 'c16 or c64')}
  running=$(running_apps)
  log "running: [$running]; gating $target: ${POINTS:-all points}"
  # not kept by an earlier step: deploy it alone on a fresh head (the ninth session's step 12 deployed
  # colloc-1xtp2 beside step 13's PD and TP1 apps, whose 3 GPUs left its placement group waiting 360 s)
  case " $running " in *" $target "*) ;; *) log "$target is not running: a fresh head"
    scripts/gpu-testmachine.sh --stop ;; esac
  suite "ray-adopted-$target" 520 -m sweep --topology "$target" "${common[@]}" --deploy-timeout 360 \
    --record-missing-baselines -k "${POINTS:-c}"
  ;;
10|11)
  # the sweep only, from c4 (the smoke tier ran for TP1, TP2 and PD 1P1D; c1's 16 sequential requests
  # take ~2 min): a PD TP2 start-up of 5+ min leaves c4-c64 in one call. MARKS='smoke or sweep' and
  # FIRST_POINT=none bring them back.
  [ "$step" = 10 ] && target=$T_COLLOC4 || target=$T_PD4
  scripts/gpu-testmachine.sh --stop
  MARKS=${MARKS:-sweep} DEPLOY_TIMEOUT_S=420 record "ray-record-$target" "$target" \
    --deselect "tests/sweeps/test_sweeps.py::test_point[$target/$WORKLOAD/${FIRST_POINT:-c1}]"
  ;;
13)
  # the greedy check alone (PD's tokens against a collocated engine's, temperature 0): both start
  # side by side on a fresh head (~350 s); never run on GPU before (step 2's budget ended first)
  scripts/gpu-testmachine.sh --stop
  suite ray-greedy-alone 520 -m smoke -k greedy --topology "$T_PD" "${common[@]}" --deploy-timeout 420
  ;;
*) echo "step must be 1 to 13" >&2; exit 2 ;;
esac
