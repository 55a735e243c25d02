#!/usr/bin/env python3
"""Re-balance ../shared/gpu/stage.sh's chunks (.gpu/cNN) so that each `run` call fits its 64 MiB.

A call carries the chunk *and* the working tree (tracked files + untracked, not ignored). stage.sh
fills each chunk to ~58 MiB; once the repo's own files pass ~6 MiB a call is refused ("the working
tree is larger than 64 MiB"). This packs the chunks' files anew (first fit, largest
first) into `.gpu/c00` ... so that chunk + tree fits with a margin, and prints the chunks to send.
Split wheels (`*.partNN`) stay whole files: install.sh joins them wherever they came from.

It also writes the commit the calls will carry into `.gpu/c00/pdperf-git-sha`: the device's copy of
`.git` lagged the tree (session 8's points read the previous session's HEAD "-dirty"), so
fidelity-session.sh exports it as PDPERF_GIT_SHA, which the recorded environment prefers.

Each chunk gets a marker, `pdperf-chunk-NN-of-MM`: tools/gpu-testmachines/install.sh names the chunks whose copy
call did not arrive (the ninth session's first call found no machine, its chunk was missing, and
install.sh failed on an import) before installing anything.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 1024 * 1024
SHA_FILE = "pdperf-git-sha"
MARGIN = 2 * 1024 * 1024


def tree_bytes(repo: Path) -> int:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, check=True, capture_output=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def main() -> int:
    repo = Path(__file__).resolve().parents[2]
    gpu = repo / ".gpu"
    chunks = sorted(p for p in gpu.glob("c[0-9][0-9]") if p.is_dir())
    if not chunks:
        print(f"no chunks under {gpu}: run ../shared/gpu/stage.sh first", file=sys.stderr)
        return 2
    cap = LIMIT - MARGIN - tree_bytes(repo)
    for old in [*gpu.glob(f"c[0-9][0-9]/{SHA_FILE}"), *gpu.glob("c[0-9][0-9]/pdperf-chunk-*")]:  # written anew
        old.unlink()
    files = sorted((f for c in chunks for f in c.iterdir()), key=lambda f: -f.stat().st_size)
    bins: list[list[Path]] = []
    room: list[int] = []
    for f in files:  # first fit, largest first
        sz = f.stat().st_size
        if sz > cap:
            print(f"{f.name}: {sz} bytes alone is over the {cap} a call has room for beside the tree; "
                  "re-run stage.sh with smaller parts", file=sys.stderr)
            return 1
        i = next((i for i, r in enumerate(room) if r >= sz), None)
        if i is None:
            bins.append([])
            room.append(cap)
            i = len(bins) - 1
        bins[i].append(f)
        room[i] -= sz
    staging = gpu / "rechunk.tmp"
    staging.mkdir()
    for i, b in enumerate(bins):
        (staging / f"c{i:02d}").mkdir()
        for f in b:
            f.rename(staging / f"c{i:02d}" / f.name)
    for c in chunks:
        c.rmdir()
    for d in sorted(staging.iterdir()):
        d.rename(gpu / d.name)
    staging.rmdir()
    sys.path.insert(0, str(repo))
    from pdperf.environment import git_sha
    sha = git_sha(repo) or "unknown"
    (gpu / "c00" / SHA_FILE).write_text(sha + "\n")
    for i in range(len(bins)):
        (gpu / f"c{i:02d}" / f"pdperf-chunk-{i:02d}-of-{len(bins):02d}").write_text("")
    print(f"the calls carry {sha}{'  (uncommitted changes: commit, then run this again)' if 'dirty' in sha else ''}")
    size = {gpu / f"c{i:02d}": cap - r for i, r in enumerate(room)}
    for c in sorted(size):
        print(f"{c.name} {size[c]} bytes (cap {cap})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
