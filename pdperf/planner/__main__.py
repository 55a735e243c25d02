"""``python -m pdperf.planner``: see :mod:`pdperf.planner.cli`."""

import sys

from pdperf.planner.cli import main

sys.exit(main())
