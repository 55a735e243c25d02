#!/usr/bin/env bash
# Runs the suite on a lent GPU test machine (1-4 H100/H200, no registry; stack staged from
# ../shared/gpu: vLLM 0.26.0, Ray 2.58.1, NIXL 1.3.1, python3 = the image's torch 2.11).
# Starts (or reuses) a Ray head for this machine's GPUs, so deployments can outlive one pytest
# run with --keep-deployments, then runs pytest with the given arguments. Results go to $OUT
# when set (the device tool copies it back), else reports/.
#   tools/gpu-testmachines/testmachine.sh -m smoke --topology colloc-2xtp1 --model llama-3.1-8b
#   tools/gpu-testmachines/testmachine.sh --stop      # tear the Ray head down
# PDPERF_CALL_BUDGET_S (default 550) stops pytest with SIGINT (a clean interrupt: reports are
# written, kept deployments stay up) before the device tool's 600 s limit kills everything.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Never NVLink multicast on the lent machines (their rule: it can take the host's shared GPUs
# out of service; never call cuMulticastCreate). NCCL, PyTorch and NVSHMEM have switches.
# vLLM 0.26 with TP >= 2 on H100 also turns on FlashInfer's all-reduce + RMSNorm fusion, whose
# "auto" backend is mnnvl, which calls cuMulticastCreate: pin trtllm (CUDA IPC), turn vLLM's
# symmetric-memory all-reduce off, and switch the fusion pass off in every engine (below).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm VLLM_ALLREDUCE_USE_SYMM_MEM=0
NO_MULTICAST_ARGS=(--engine-arg 'compilation_config={pass_config: {fuse_allreduce_rms: false}}')
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-/tmp/vllm-cache} RAY_USAGE_STATS_ENABLED=0
PY=${PDPERF_PYTHON:-python3}  # the python that has the stack (the image's python3 on GPU machines)
ray() { "$(dirname "$(command -v "$PY")")/ray" "$@"; }  # the ray CLI beside it
if [ "${1:-}" = "--stop" ]; then
  ray stop --force >/dev/null 2>&1
  pkill -9 -f '^VLLM::' 2>/dev/null  # `ray stop` leaves vLLM's engine-core/worker grandchildren behind
  exit 0
fi
ray_args=(--ray-address auto)
case " $* " in *" --backend vllm "*|*" --backend=vllm "*) ray_args=() ;; esac  # no Ray for the vllm backend
if [ ${#ray_args[@]} -gt 0 ] && ! pgrep -x raylet >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  # Logical CPUs are Ray's accounting only: each ingress replica reserves 1 and each engine
  # TP+1, so two 8-ingress apps on a 16-core box need more than nproc (placement.logical_cpus).
  cpus=$(( $(nproc) * 4 > 32 ? $(nproc) * 4 : 32 ))
  # In a session of its own: the device tool kills what a call leaves running unless it started a
  # new session, and kept deployments must outlive the call (seen: engines gone between calls).
  # Ray exports vLLM's metrics every 10 s by default: a point's after-scrape then misses its last
  # seconds (pdperf/backends/ray_serve.py METRICS_REPORT_INTERVAL_MS)
  RAY_metrics_report_interval_ms=${RAY_metrics_report_interval_ms:-1000} \
  setsid -w "$(dirname "$(command -v "$PY")")/ray" start --head --num-gpus "$gpus" --num-cpus "$cpus" --include-dashboard=false \
    --node-ip-address 127.0.0.1 --disable-usage-stats >/tmp/ray-start.log 2>&1 || { cat /tmp/ray-start.log; exit 1; }
fi
stamp=run-$(date +%H%M%S)
run_dir=reports/$stamp
timeout -s INT -k 30 "${PDPERF_CALL_BUDGET_S:-550}" \
  "$PY" -m pytest "${ray_args[@]}" --run-dir="$run_dir" -o log_cli=true -o log_cli_level=WARNING \
  "${NO_MULTICAST_ARGS[@]}" "$@"
rc=$?
[ $rc = 124 ] && echo "testmachine.sh: pytest stopped after ${PDPERF_CALL_BUDGET_S:-550} s (PDPERF_CALL_BUDGET_S)"
# The device tool returns at most 8 files from $OUT: one archive of the run, one of the baselines,
# and the cluster's state (Serve, placement groups, replica logs, GPUs) as the run left it.
if [ -n "${OUT:-}" ]; then
  pgrep -x raylet >/dev/null && timeout "${PDPERF_DIAG_TIMEOUT_S:-120}" "$PY" -m pdperf.cli diagnose --lines 60 > "$OUT/$stamp-diag.txt" 2>&1
  [ -d "$run_dir" ] && tar czf "$OUT/$stamp.tgz" -C "$run_dir" .
  [ -d baselines ] && tar czf "$OUT/$stamp-baselines.tgz" baselines
fi
exit $rc
