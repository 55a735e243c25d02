"""``python -m pdperf.report RUN_DIR`` rebuilds a run's summary.html and results.csv.

``python -m pdperf.report --demo OUT_DIR`` writes a synthetic run there first, to see what
a report looks like without a cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdperf.errors import PdperfError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdperf.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run folder: reports/<run-id>/ with run.json and points/")
    ap.add_argument("--demo", action="store_true", help="first write a synthetic run into RUN_DIR")
    args = ap.parse_args(argv)
    from pdperf.report import build_report
    try:
        if args.demo:
            from pdperf.report.synthetic import write_demo_run
            write_demo_run(args.run_dir)
        path = build_report(args.run_dir)
    except PdperfError as e:
        print(f"pdperf.report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
