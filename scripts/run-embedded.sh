#!/usr/bin/env bash
# The main job on the embedded default: set up the real stack on CPU (vLLM CPU build + Ray Serve
# LLM + NIXL), build the tiny local model, stand up collocated and PD 1P1D through Ray Serve LLM,
# run the smoke tier against both, and write the HTML report under reports/<run-id>/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh cpu
.venv/bin/python -m pytest -m smoke "$@"
