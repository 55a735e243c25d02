"""pytest-benchmark: the harness's own hot paths, so a change that slows them shows up.

Run: ``.venv/bin/python -m pytest benchmarks/test_harness_speed.py --benchmark-only``
(add ``--benchmark-autosave`` / ``--benchmark-compare`` to keep and compare runs per machine).
Not part of CI's test run: timings on a shared 2-core machine are for comparison, not gating.
"""

from __future__ import annotations

import numpy as np
import pytest

from pdperf import metrics, stats
from pdperf.loadgen.client import SSEParser
from pdperf.results import RequestRecord


def _records(n: int, tokens: int = 256) -> list[RequestRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t0 = i * 0.01
        first = t0 + 0.05 + rng.random() * 0.01
        gaps = 0.008 + rng.random(tokens - 1) * 0.002
        times = [first, *(first + np.cumsum(gaps)).tolist()]
        out.append(RequestRecord(index=i, scheduled_s=t0, sent_s=t0, first_token_s=first, end_s=times[-1],
                                 chunk_times_s=times, chunk_tokens=[1] * tokens, input_tokens=1024,
                                 output_tokens=tokens))
    return out


@pytest.mark.parametrize("n", [1000, 5000])
def test_summarize_point(benchmark, n):
    recs = _records(n)
    out = benchmark(metrics.summarize, recs, duration_s=60.0, gpus=2)
    assert out["requests_ok"] == n


def test_sse_parse_10k_events(benchmark):
    event = b'data: {"choices":[{"text":"x"}],"usage":{"completion_tokens":1}}\n\n'
    payload = event * 10_000

    def parse():
        p = SSEParser()
        n = 0
        for i in range(0, len(payload), 1500):  # MTU-sized reads split events across reads
            n += len(p.feed(payload[i:i + 1500]))
        return n

    assert benchmark(parse) == 10_000


def test_gate_statistics_5000_samples(benchmark):
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(3, 0.3, 5000), rng.lognormal(3.05, 0.3, 5000)

    def gate():
        return stats.mann_whitney_u(a, b).p_value, stats.bootstrap_ratio_ci(a, b, "p99")

    p, ci = benchmark(gate)
    assert 0 <= p <= 1 and ci is not None
