#!/usr/bin/env bash
# The install call of a GPU session (carry .gpu/install.sh): checks that every chunk's copy call
# arrived (markers pdperf-chunk-NN-of-MM, written by tools/gpu-testmachines/rechunk.py), then runs
# ../shared/gpu's install.sh and leaves /tmp/w/pdperf-installed for the session scripts.
# A copy call that found no machine leaves its chunk out: install.sh then fails on an import.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${GPU_STAGE_DIR:-/tmp/w}
rm -f "$W/pdperf-installed"
marker=$(ls "$W"/pdperf-chunk-*-of-* 2>/dev/null | head -1)
if [ -z "$marker" ]; then
  echo "gpu-install: no chunk marker in $W: no chunk arrived, or they were staged before tools/gpu-testmachines/rechunk.py wrote markers; resend the copy calls" >&2
  exit 3
fi
of=${marker##*-of-}
missing=()
for ((i = 0; i < 10#$of; i++)); do
  n=$(printf %02d "$i")
  [ -e "$W/pdperf-chunk-$n-of-$of" ] || missing+=("c$n")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu-install: chunk(s) ${missing[*]} missing in $W (their copy call failed, e.g. no machine yet): resend" \
       "'mkdir -p $W && cp -r .gpu/cNN/. $W/' with carry .gpu/cNN for each, then this again" >&2
  exit 3
fi
bash .gpu/install.sh && touch "$W/pdperf-installed"
