"""Load generator: streaming client, load models, datasets, server telemetry, one-point runner.

The suite calls :func:`run_point` (and :func:`single_request` in smoke tests); the rest is
exposed for tests and benchmarks. docs/METHODOLOGY.md ("Load generator") says how each
number is taken and why.
"""

from pdperf.loadgen.runner import (
    reset_prefix_cache,
    run_point,
    run_point_async,
    single_request,
    single_request_async,
)

__all__ = ["run_point", "run_point_async", "single_request", "single_request_async", "reset_prefix_cache"]
