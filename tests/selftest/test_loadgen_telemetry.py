"""Prometheus parsing and before/after deltas, on a real vLLM 0.32 capture and synthetic samples.

``data/loadgen_vllm0.32_metrics_{before,after}.txt`` were scraped from ``vllm serve`` (CPU build,
tiny model) before and after 61 requests (trimmed to the ``vllm:`` families). prometheus_client's
own parser, where installed, is the independent oracle for the sums.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pdperf.loadgen.telemetry import (
    TelemetryWindow,
    delta,
    normalize_name,
    parse_prometheus,
    summarize,
)
from pdperf.results import Telemetry

pytestmark = pytest.mark.selftest

DATA = Path(__file__).parent / "data"
BEFORE = (DATA / "loadgen_vllm0.32_metrics_before.txt").read_text()
AFTER = (DATA / "loadgen_vllm0.32_metrics_after.txt").read_text()
URL = "http://127.0.0.1:1/metrics"


def _oracle_total(text: str, sample_name: str) -> float:
    parser = pytest.importorskip("prometheus_client.parser")
    total = 0.0
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample_name:
                total += s.value
    return total


def test_parser_reads_labels_values_and_skips_comments():
    text = ('# HELP x_total a counter\n# TYPE x_total counter\n'
            'x_total{a="1",b="q\\"uote"} 3\n'
            'vllm:h_bucket{le="+Inf",engine="0"} 7 1700000000000\n'
            'vllm:h_created 1.7e9\n'
            'g NaN\n'
            'not a sample line\n')
    s = parse_prometheus(text)
    assert s[("x_total", (("a", "1"), ("b", 'q"uote')))] == 3.0
    assert s[("vllm_h_bucket", (("engine", "0"), ("le", "+Inf")))] == 7.0  # timestamp ignored
    assert all(not k[0].endswith("_created") for k in s)
    assert math.isnan(s[("g", ())])


@pytest.mark.parametrize("name,norm", [("vllm:time_to_first_token_seconds", "vllm_time_to_first_token_seconds"),
                                       ("ray_vllm_time_to_first_token_seconds", "vllm_time_to_first_token_seconds"),
                                       ("ray_vllm:num_preemptions_total", "vllm_num_preemptions_total")])
def test_names_are_normalised_across_exporters(name, norm):
    assert normalize_name(name) == norm


def test_real_capture_deltas_match_an_independent_parser():
    out = summarize({URL: BEFORE}, {URL: AFTER})
    n = _oracle_total(AFTER, "vllm:e2e_request_latency_seconds_count") - \
        _oracle_total(BEFORE, "vllm:e2e_request_latency_seconds_count")
    s = _oracle_total(AFTER, "vllm:e2e_request_latency_seconds_sum") - \
        _oracle_total(BEFORE, "vllm:e2e_request_latency_seconds_sum")
    assert out["server_requests"] == n > 0
    assert out["server_e2e_mean_s"] == pytest.approx(s / n)
    for key, fam in [("server_ttft_mean_s", "vllm:time_to_first_token_seconds"),
                     ("server_itl_mean_s", "vllm:inter_token_latency_seconds"),
                     ("server_tpot_mean_s", "vllm:request_time_per_output_token_seconds"),
                     ("queue_time_s", "vllm:request_queue_time_seconds"),
                     ("prefill_time_s", "vllm:request_prefill_time_seconds"),
                     ("decode_time_s", "vllm:request_decode_time_seconds")]:
        ds = _oracle_total(AFTER, fam + "_sum") - _oracle_total(BEFORE, fam + "_sum")
        dc = _oracle_total(AFTER, fam + "_count") - _oracle_total(BEFORE, fam + "_count")
        assert out[key] == pytest.approx(ds / dc), key
    assert out["preemptions"] == 0.0
    assert out["generation_tokens"] == _oracle_total(AFTER, "vllm:generation_tokens_total") - \
        _oracle_total(BEFORE, "vllm:generation_tokens_total")
    # a single collocated vLLM has no NIXL: absent, not zero, and no error
    assert out["kv_transfer_time_s"] is None and out["kv_bytes"] is None and out["kv_failed_transfers"] is None
    assert out["nixl_metrics_present"] == []
    assert out["counter_resets"] == [] and out["scrape_errors"] == {}
    assert out["kv_cache_usage_perc_max"] is not None
    assert out["by_url"][URL]["server_requests"] == n


def _hist(name: str, labels: str, total: float, count: float, buckets: dict[str, float]) -> str:
    lines = [f'{name}_bucket{{{labels},le="{le}"}} {v}' for le, v in buckets.items()]
    return "\n".join(lines + [f"{name}_sum{{{labels}}} {total}", f"{name}_count{{{labels}}} {count}"]) + "\n"


def test_nixl_and_ray_names_and_two_engines_are_summed():
    # a PD pair behind Ray's exporter: ray_vllm_* names, one prefill and one decode engine
    def text(xfer_sum, xfer_n, nbytes, failed, kv, ttft_sum, ttft_n, preempt):
        out = ""
        for eng, scale in (("prefill", 1.0), ("decode", 2.0)):
            lab = f'engine="0",role="{eng}"'
            out += _hist("ray_vllm_nixl_xfer_time_seconds", lab, xfer_sum * scale, xfer_n, {"0.01": xfer_n})
            out += _hist("ray_vllm_nixl_bytes_transferred", lab, nbytes, xfer_n, {"+Inf": xfer_n})
            out += _hist("ray_vllm_time_to_first_token_seconds", lab, ttft_sum, ttft_n, {"+Inf": ttft_n})
            out += f"ray_vllm_nixl_num_failed_transfers_total{{{lab}}} {failed}\n"
            out += f"ray_vllm_kv_cache_usage_perc{{{lab}}} {kv}\n"
            out += f"ray_vllm_num_preemptions_total{{{lab}}} {preempt}\n"
        return out

    before = text(1.0, 10, 1e6, 0, 0.0, 5.0, 10, 1)
    during = [text(1.5, 15, 2e6, 0, 0.7, 6.0, 12, 1)]
    after = text(3.0, 30, 4e6, 1, 0.1, 9.0, 20, 3)
    out = summarize({URL: before}, {URL: after}, [{URL: t} for t in during])
    # xfer: prefill (3-1) + decode (6-2) seconds over (30-10) x 2 transfers
    assert out["kv_transfer_time_s"] == pytest.approx((2.0 + 4.0) / 40)
    assert out["kv_transfers"] == 40
    assert out["kv_bytes"] == pytest.approx(2 * 3e6)
    assert out["kv_failed_transfers"] == 2
    assert out["server_ttft_mean_s"] == pytest.approx(8.0 / 20)
    assert out["preemptions"] == 4
    assert out["kv_cache_usage_perc_max"] == pytest.approx(0.7)  # seen only during the window
    assert "vllm_nixl_xfer_time_seconds_sum" in out["nixl_metrics_present"]
    assert out["raw"][URL]["nixl_buckets"]["vllm_nixl_xfer_time_seconds"]["0.01"] == 40


def test_older_itl_name_is_used_when_the_new_one_is_absent():
    before = _hist("vllm:time_per_output_token_seconds", 'engine="0"', 1.0, 100, {})
    after = _hist("vllm:time_per_output_token_seconds", 'engine="0"', 3.0, 300, {})
    assert summarize({URL: before}, {URL: after})["server_itl_mean_s"] == pytest.approx(0.01)


def test_counter_reset_is_reported_and_after_value_used():
    d = delta(parse_prometheus("vllm:num_preemptions_total 10\n"), parse_prometheus("vllm:num_preemptions_total 3\n"))
    assert d.resets == {"vllm_num_preemptions_total"}
    assert d.total("vllm_num_preemptions_total") == 3
    out = summarize({URL: "vllm:num_preemptions_total 10\n"}, {URL: "vllm:num_preemptions_total 3\n"})
    assert out["counter_resets"] == [f"{URL} vllm_num_preemptions_total"]


def test_unreachable_url_is_an_error_entry_not_an_exception():
    w = TelemetryWindow(["http://127.0.0.1:9/metrics"], timeout_s=0.5)  # port 9 (discard): nothing listens
    w.start()
    w.stop()
    out = w.result()
    assert "http://127.0.0.1:9/metrics" in out.scrape_errors
    assert out.server_ttft_mean_s is None


def test_no_urls_no_telemetry():
    w = TelemetryWindow([])
    w.start()
    w.sample()
    w.stop()
    assert w.result() == Telemetry()


def test_samples_during_the_window_keep_only_gauges():
    from pdperf.loadgen.telemetry import _gauge_lines

    kept = _gauge_lines(AFTER)
    assert "vllm:kv_cache_usage_perc" in kept and "vllm:num_requests_running" in kept
    assert "_bucket" not in kept and "# TYPE" not in kept
    assert len(kept) < len(AFTER) / 20


def test_ray_exports_bucket_midpoint_sums_and_they_are_marked_estimates():
    # Ray's metrics export keeps no histogram sums: it replays each observation at its bucket's
    # midpoint. Every Ray point's queue time read 0.15 s (vLLM's first bucket is 0-0.3 s) while TTFT
    # was 47 ms (CPU) - a mean known only to within its buckets.
    before = _hist("ray_vllm_request_queue_time_seconds", 'engine="0"', 0.0, 0, {"0.3": 0, "0.5": 0, "+Inf": 0})
    after = _hist("ray_vllm_request_queue_time_seconds", 'engine="0"', 10 * 0.15, 10,
                  {"0.3": 10, "0.5": 10, "+Inf": 10})
    out = summarize({URL: before}, {URL: after})
    assert out["queue_time_s"] == pytest.approx(0.15)
    assert out["estimated_means"] == ["queue_time_s"]
    assert out["mean_bounds_s"]["queue_time_s"] == pytest.approx([0.0, 0.3])
    assert out["by_url"][URL]["estimated_means"] == ["queue_time_s"]
    # one observation past the last bound: Ray puts it at twice that bound; no upper bound is proven
    tail = _hist("ray_vllm_request_queue_time_seconds", 'engine="0"', 8 * 0.15 + 0.4 + 1.0, 10,
                 {"0.3": 8, "0.5": 9, "+Inf": 10})
    out = summarize({URL: before}, {URL: tail})
    assert out["estimated_means"] == ["queue_time_s"]
    assert out["mean_bounds_s"]["queue_time_s"][0] == pytest.approx((0.3 + 0.5) / 10)
    assert out["mean_bounds_s"]["queue_time_s"][1] is None


def test_exact_sums_are_not_marked():
    exact = _hist("vllm:request_queue_time_seconds", 'engine="0"', 0.0123 * 10, 10, {"0.3": 10, "+Inf": 10})
    zero = _hist("vllm:request_queue_time_seconds", 'engine="0"', 0.0, 0, {"0.3": 0, "+Inf": 0})
    out = summarize({URL: zero}, {URL: exact})
    assert out["queue_time_s"] == pytest.approx(0.0123) and out["estimated_means"] == []
    real = summarize({URL: BEFORE}, {URL: AFTER})  # vLLM's own exporter (a real capture): exact sums
    assert real["estimated_means"] == [] and real["mean_bounds_s"] == {}


def test_a_falling_gauge_named_count_is_no_counter_reset():
    """Ray exports its own `operation_active_count` (a gauge) beside vLLM's metrics: seen on one H200,
    its fall between two scrapes flagged a healthy point telemetry_counter_reset."""
    before = "operation_active_count 5\nvllm:request_success_total 3\nvllm:e2e_request_latency_seconds_sum 1.0\n" \
             "vllm:e2e_request_latency_seconds_count 3\n"
    after = "operation_active_count 2\nvllm:request_success_total 5\nvllm:e2e_request_latency_seconds_sum 2.0\n" \
            "vllm:e2e_request_latency_seconds_count 5\n"
    out = summarize({"u": before}, {"u": after})
    assert out["counter_resets"] == []
    restarted = "vllm:request_success_total 1\nvllm:e2e_request_latency_seconds_sum 0.5\n" \
                "vllm:e2e_request_latency_seconds_count 1\n"
    assert {r.split()[1] for r in summarize({"u": before}, {"u": restarted})["counter_resets"]} >= {
        "vllm_request_success_total", "vllm_e2e_request_latency_seconds_count"}
