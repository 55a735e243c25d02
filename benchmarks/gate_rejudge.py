"""The runs of benchmarks/gate_detection.py judged again, offline, under other gate limits.

What would tighter limits have caught, and at what false-alarm cost, on the *same* measured
runs? Every run folder that gate_detection.py kept (``--keep``) is gated again against the band it
recorded, with the CPU hardware override's ``max_change`` values multiplied by each ``--scales``
factor (1.0 = the committed thresholds). Counts are per gated point: ``regressed`` on the first
measurement, and ``confirmed`` where the live run re-measured the point (a re-measurement exists
only where the committed limits flagged it; a point that only a tighter limit flags has none, so
its confirmed count is an upper bound, marked so).

    .venv/bin/python benchmarks/gate_rejudge.py /tmp/gd-long --baselines /tmp/pdperf-gate-detection-XXXX/baselines \\
        --scales 1,0.6,0.4,0.3 --json benchmarks/results/DATE-gate-rejudge-cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gate_detection import wilson  # noqa: E402

from pdperf.gate.thresholds import Thresholds  # noqa: E402
from pdperf.gate.verdicts import gate_point  # noqa: E402
from pdperf.results import load_point  # noqa: E402

RUN_DIR = re.compile(r"^round(?P<round>\d+)-(?P<slot>\d+)-s(?P<level>[0-9.]+)$")


def scaled_thresholds(path: Path, scale: float) -> Thresholds:
    """The thresholds file with every CPU override's max_change multiplied by ``scale``."""
    doc = yaml.safe_load(path.read_text())
    for hw in doc.get("hardware", []):
        if str(hw.get("match", "")).startswith("cpu"):
            for g in hw.get("gates", []):
                if "max_change" in g:
                    g["max_change"] = round(g["max_change"] * scale, 4)
    return Thresholds(**doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("keep", type=Path, help="gate_detection.py's --keep folder")
    ap.add_argument("--baselines", type=Path, required=True, help="the band gate_detection.py recorded")
    ap.add_argument("--scales", default="1,0.6,0.4,0.3")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs = [(m, d) for d in sorted(args.keep.iterdir()) if (m := RUN_DIR.match(d.name))]
    if not runs:
        sys.exit(f"{args.keep}: no round*-*-s* run folders (gate_detection.py --keep)")
    out = []
    for scale in (float(x) for x in args.scales.split(",")):
        thresholds = scaled_thresholds(args.baselines / "thresholds.yaml", scale)
        counts: dict[float, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for m, d in runs:
            level = float(m.group("level"))
            for f in sorted((d / "points").glob("*.json")):
                first = gate_point(args.baselines, load_point(f), thresholds)
                c = counts[level]
                c["points"] += 1
                if first.status != "regressed":
                    continue
                c["regressed"] += 1
                again = sorted((d / "points" / "confirm").glob(f"{f.stem}.confirm-*.json"))
                if not again:
                    c["no_remeasure"] += 1
                elif gate_point(args.baselines, load_point(again[0]), thresholds).status == "regressed":
                    c["confirmed"] += 1
        for level in sorted(counts):
            c = counts[level]
            n, k = c["points"], c["regressed"]
            conf_hi = c["confirmed"] + c["no_remeasure"]
            row = {"scale": scale, "slowdown": level, "points": n, "regressed_first": k,
                   "regressed_first_wilson95": [round(x, 3) for x in wilson(k, n)],
                   "confirmed": c["confirmed"], "confirmed_upper": conf_hi,
                   "confirmed_wilson95": [round(x, 3) for x in wilson(c["confirmed"], n)]}
            out.append(row)
            print(f"limits x{scale:g} slowdown {level:g}: first measurement regressed {k}/{n}; "
                  f"confirmed {c['confirmed']}/{n}" + (f" (up to {conf_hi} without a re-measurement)"
                                                         if c["no_remeasure"] else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
