"""The metric registry is the one definition: every computed metric is in it, with its granularity."""

from __future__ import annotations

import pytest

from pdperf import metrics
from pdperf.errors import SpecError
from pdperf.specs import SLO, SLO_METRICS

pytestmark = pytest.mark.selftest


def test_every_sampled_metric_is_registered_with_its_granularity():
    assert set(metrics.PER_REQUEST_METRICS) == {n for n, m in metrics.METRICS.items() if m.granularity == "request"}
    assert set(metrics.PER_GAP_METRICS) == {n for n, m in metrics.METRICS.items() if m.granularity == "gap"}
    assert set(metrics.LATENCY_METRICS) == set(metrics.PER_REQUEST_METRICS) | set(metrics.PER_GAP_METRICS)
    assert all(metrics.METRICS[m].lower_is_better for m in metrics.LATENCY_METRICS)
    assert set(SLO_METRICS) <= set(metrics.LATENCY_METRICS)


def test_summary_holds_a_distribution_of_every_sampled_metric():
    assert set(metrics.summarize([], duration_s=1.0).metrics) == set(metrics.LATENCY_METRICS)


@pytest.mark.parametrize("text,needle", [("p99_output_tok_per_s_ms <= 5", "unknown; an SLO bounds one of"),
                                         ("p99_chunk_gap_ms <= 5", "an SLO bounds one of")])
def test_slo_on_a_metric_it_cannot_bound_names_the_ones_it_can(text, needle):
    with pytest.raises(SpecError, match=needle):
        SLO.parse(text)
