"""The run report (HTML, CSV) and its SVG charts, built from synthetic run folders.

Checks what a reader relies on: the file opens offline (nothing fetched, no script), every
section is there or says why not, loud things are loud (flags, failed requests, skips
with their reason, regressions), and the CSV carries the same numbers as the points.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pdperf import metrics
from pdperf.report import ReportError, build_report, summary_fragment
from pdperf.report.export import SCALARS, csv_rows
from pdperf.report.plots import LegendItem, RatioRow, Series, line_chart, ratio_chart, stacked_bar_chart
from pdperf.report.synthetic import synthetic_point, write_demo_run
from pdperf.results import atomic_write_json, save_point

pytestmark = pytest.mark.selftest


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    run_dir = write_demo_run(tmp_path_factory.mktemp("reports") / "run-demo", n=60)
    html_path = build_report(run_dir)
    return run_dir, html_path.read_text()


def _svgs(html: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", html, flags=re.S)


def test_build_report_writes_html_and_csv(demo):
    run_dir, html = demo
    assert (run_dir / "summary.html").is_file() and (run_dir / "results.csv").is_file()
    assert html.startswith("<!DOCTYPE html>") and "<title>pdperf run run-demo</title>" in html
    assert (run_dir / "summary.html").stat().st_mode & 0o044 == 0o044  # shareable, not 0600


def test_report_is_self_contained(demo):
    _, html = demo
    assert "<script" not in html and "<link" not in html and "<img" not in html
    without_ns = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_ns and "https://" not in without_ns


def test_report_shows_environment_and_run_metadata(demo):
    _, html = demo
    for text in ("h100-80gb-x4", "<td>ray</td>", "2.60.0", "<td>vllm</td>", "<td>nixl</td>", "settings.UCX_TLS",
                 "git sha", "pytest -m sweep"):
        assert text in html, text


def test_report_is_loud_about_flags_failures_and_skips(demo):
    _, html = demo
    assert "needs attention" in html
    attention = html.split('<div class="attention">', 1)[1].split("</div>", 1)[0]
    assert "collocated-1x-tp2/isl1024-osl16/c64" in attention and 'class="flag"' in attention
    assert "3 of 63 requests failed (3 http_5xx (503 synthetic))" in attention
    assert "fewer than 100 successful requests" in attention  # n=60 per point
    assert '<tr class="flagged">' in html
    assert "topology pd-2p2d-spread needs 2 GPU nodes, found 1" in html  # the skip with its reason
    assert "pd-1p1d/isl1024-osl16/c64: p99 tpot_ms 14.1 -&gt; 29.8 ms" in html  # the gate's one-line message
    assert html.count('<span class="badge b-passed">passed</span>') == 11  # what ran leads the verdicts
    assert "1 skipped test, by reason" in html


def test_report_tables_per_topology(demo):
    run_dir, html = demo
    for topo in ("collocated-1x-tp2", "collocated-2x-tp1", "pd-1p1d"):
        assert f"<h3>{topo} <span" in html
    for head in ("TTFT ms", "TPOT ms", "ITL ms", "E2E ms", "out tok/s per GPU", "goodput req/s"):
        assert head in html
    p = json.loads(next((run_dir / "points").glob("pd-1p1d__*c16.json")).read_text())
    p99 = p["summary"]["metrics"]["tpot_ms"]["p99"]
    assert f">{p99:.3g}<" in html


def test_report_plots_have_axes_units_and_legends(demo):
    _, html = demo
    svgs = _svgs(html)
    assert len(svgs) >= 5  # TTFT, TPOT, Pareto, attribution, baseline ratios
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML
    joined = "".join(svgs)
    for label in ("concurrency (in-flight requests)", "TTFT (ms)", "TPOT (ms)", "output tokens/s per GPU",
                  "median TPOT (ms)", "mean time per request (ms)", "KV transfer", "median (p50)", "Pareto frontier"):
        assert label in joined, label


def test_report_compares_pd_and_collocated_at_equal_gpus(demo):
    _, html = demo
    section = html.split("<h2>PD vs collocated at equal GPU count</h2>", 1)[1].split("<h2>", 1)[0]
    assert "pd-1p1d vs collocated-1x-tp2" in section and "pd-1p1d vs collocated-2x-tp1" in section
    assert "PD wins</span> on p99 TPOT at" in section
    assert "PD loses</span> on median TTFT at c1" in section


def test_results_csv_has_one_row_per_point_and_metric(demo):
    run_dir, _ = demo
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    points = list((run_dir / "points").glob("*.json"))
    assert len(rows) == len(points) * (len(metrics.LATENCY_METRICS) + len(SCALARS))
    row = next(r for r in rows if r["id"] == "pd-1p1d/isl1024-osl16/c16" and r["metric"] == "ttft_ms")
    p = json.loads(next((run_dir / "points").glob("pd-1p1d__*c16.json")).read_text())
    assert float(row["p99"]) == pytest.approx(p["summary"]["metrics"]["ttft_ms"]["p99"])
    assert row["unit"] == "ms" and row["run_id"] == "run-demo"
    per_gpu = next(r for r in rows if r["id"] == row["id"] and r["metric"] == "output_tok_per_s_per_gpu")
    assert float(per_gpu["value"]) > 0 and per_gpu["unit"] == "tok/s/GPU"


def test_summary_fragment_has_no_document_wrapper(demo):
    run_dir, _ = demo
    frag = summary_fragment(run_dir)
    assert frag.startswith('<div class="pdperf-report"><style>') and frag.endswith("</div>")
    assert "<html" not in frag and "<body" not in frag and "<svg" in frag and "<table" in frag
    assert re.search(r"^\s*(body|table|h1)\s*\{", frag, flags=re.M) is None  # CSS scoped, not global


def test_minimal_run_folder_says_what_is_missing(tmp_path):
    # no run.json, no verdicts.json, CPU points (0 GPUs), no telemetry, one PD topology only, a rate sweep
    run_dir = tmp_path / "run-min"
    for rate in (1, 2):
        p = synthetic_point("pd-1p1d", "isl64-osl8", rate, sweep_kind="rate", gpus=0, n=30, output_tokens=8,
                            seed=rate)
        save_point(run_dir / "points" / f"{p.point_id}.json", p)
    (run_dir / "points" / "broken.json").write_text("{")
    html = build_report(run_dir).read_text()
    assert "run.json: missing" in html
    assert "broken.json: not JSON" in html
    assert "verdicts.json is absent" in html
    assert "request rate (req/s)" in html
    assert "n/a (CPU)" in html and "output tokens/s (total: CPU points have no GPUs)" in html
    assert "no PD and collocated topology share a workload" in html
    assert re.search(r"Server-side latency attribution.*</strong>: not drawn, the points carry no telemetry", html)
    assert "From the first point (run.json has no environment)" in html


def test_duplicate_points_and_unexplained_skips_are_called_out(tmp_path):
    run_dir = tmp_path / "run-dup"
    a = synthetic_point("collocated-1x", "w", 4, n=20, output_tokens=4, seed=7)
    b = synthetic_point("collocated-2x", "w", 4, n=20, output_tokens=4, seed=7)
    save_point(run_dir / "points" / "a.json", a)
    save_point(run_dir / "points" / "b.json", b)
    atomic_write_json(run_dir / "verdicts.json", [
        {"test_id": "t::x", "outcome": "skipped", "reason": "", "slo": [], "gate": None},
        {"test_id": "t::<y>", "outcome": "failed", "reason": "<script>alert(1)</script>", "slo": [
            {"slo": "p99_ttft_ms <= 10", "metric": "ttft_ms", "percentile": 99, "bound": 10, "observed": 55.0,
             "passed": False}], "gate": None}])
    html = build_report(run_dir).read_text()
    assert "identical per-request timings" in html
    assert "skipped without a reason" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "✗ p99_ttft_ms &lt;= 10 (observed 55)" in html


def test_missing_run_folder_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="no such run folder"):
        build_report(tmp_path / "nope")


def test_csv_rows_skip_missing_values():
    p = synthetic_point("pd-x", "w", 1, gpus=0, n=12, output_tokens=3)
    rows = csv_rows([p], run_id="r")
    assert not any(r["metric"] == "output_tok_per_s_per_gpu" for r in rows)  # None for CPU points


# --------------------------------------------------------------------------- charts


def test_line_chart_breaks_lines_at_missing_values_and_picks_log_axes():
    s = Series("a", [1, 2, 4, 8], [1.0, None, 3.0, 4.0])
    svg = line_chart([s], title="t", x_label="x (u)", y_label="y (ms)")
    ET.fromstring(svg)
    assert svg.count("<path") == 1  # the None splits [1] | [4, 8]: one segment long enough for a path
    assert svg.count("<circle") == 3
    wide = line_chart([Series("b", [1, 64], [1.0, 5000.0])], title="t", x_label="x", y_label="y")
    assert ">1k<" in wide or ">1,000<" in wide  # log y ticks at decades
    assert "not drawn, no data points" in line_chart([Series("c", [1], [None])], title="t", x_label="x",
                                                     y_label="y")


def test_charts_escape_text_and_draw_legends():
    svg = line_chart([Series("<a&b>", [1, 2], [1, 2])], title="T<", x_label="x", y_label="y",
                     legend=[LegendItem("<a&b>", "#000"), LegendItem("p99", "#555", dashed=True)])
    ET.fromstring(svg)
    assert "&lt;a&amp;b&gt;" in svg and 'stroke-dasharray="6 4"' in svg
    bars = stacked_bar_chart([("x", {"q": 1.0, "d": 2.0}), ("empty", {})], ["q", "d"], title="t", x_label="ms",
                             segment_labels={"q": "queue"})
    ET.fromstring(bars)
    assert bars.count("<rect") >= 2 + 2 and "queue" in bars and "empty" not in bars
    ratios = ratio_chart([RatioRow("p", 2.0, 1.8, 2.2, 1.5, 1 / 1.5, "regressed")], title="r")
    ET.fromstring(ratios)
    assert "#c62828" in ratios


def test_topology_kind_from_key_spec_or_name():
    from pdperf.report.rundata import topology_kind

    def kind(name: str, **env) -> str:
        return topology_kind(synthetic_point(name, n=3, output_tokens=2, environment={"hardware_id": "x", **env}))

    assert kind("pd-1p1d") == "pd" and kind("cpu-pd-1p1-1d1") == "pd" and kind("colloc-2xtp4") == "collocated"
    assert kind("apd-x") == "collocated"  # 'pd' must be a dash-separated word
    assert kind("pd-looking-name", topology_kind="collocated") == "collocated"  # an explicit key wins


def test_engine_restart_seen_in_telemetry_is_loud(tmp_path):
    run_dir = tmp_path / "run-reset"
    p = synthetic_point("pd-1p1d", "w", 4, n=12, output_tokens=3,
                        telemetry={"queue_time_s": 0.01, "counter_resets": ["http://e1/metrics vllm_x"]})
    save_point(run_dir / "points" / "p.json", p)
    html = build_report(run_dir).read_text()
    assert '<li class="loud"><code>pd-1p1d/w/c4</code>: engine counters went down' in html
    assert "Server-side latency attribution (means) — w</title>" in html  # a plain float mean is enough


def test_gpu_clocks_of_each_point_under_its_topology_table(tmp_path):
    run_dir = tmp_path / "run-gpu"
    busy = {"sm_clock_mhz_min": 1410.0, "sm_clock_mhz_max": 1980.0, "clock_reasons_busy": ["sw_thermal_slowdown"]}
    steady = {"sm_clock_mhz_min": 1980.0, "sm_clock_mhz_max": 1980.0, "clock_reasons_busy": []}
    idle_only = {"sm_clock_mhz_min": None, "sm_clock_mhz_max": None, "clock_reasons_busy": []}
    for c, gpu in ((4, {"0": busy, "1": steady}), (16, {"0": steady, "1": idle_only})):
        save_point(run_dir / "points" / f"c{c}.json",
                   synthetic_point("pd-1p1d", "w", c, n=12, output_tokens=3, telemetry={"gpu": {"per_gpu": gpu}}))
    save_point(run_dir / "points" / "cpu.json", synthetic_point("cpu-colloc", "w", 1, n=12, output_tokens=3))
    html = build_report(run_dir).read_text()
    assert "GPU SM clocks while busy" in html
    assert "c4 1410-1980 MHz (sw_thermal_slowdown); c16 1980 MHz" in html
    assert html.count("GPU SM clocks while busy") == 1  # the CPU topology's table has none


def test_serving_processes_cpu_of_each_point_under_its_topology_table(tmp_path):
    run_dir = tmp_path / "run-host"
    roles = {"VLLM::EngineCore": {"processes": 2, "cpu_cores": 1.9, "wait_cores": 0.02, "wait_cores_max": 0.31},
             "colloc/OpenAiIngress": {"processes": 8, "cpu_cores": 0.4, "wait_cores": 0.0, "wait_cores_max": 0.01},
             "pd/Decode": {"processes": 1, "cpu_cores": 0.25, "wait_cores": 0.5, "wait_cores_max": 0.9},
             "pd/VLLM::EngineCore": {"processes": 1, "cpu_cores": 0.25, "wait_cores": 0.25, "wait_cores_max": 0.3}}
    save_point(run_dir / "points" / "c4.json",
               synthetic_point("colloc", "w", 4, n=12, output_tokens=3, telemetry={"host_cpu": {"roles": roles}}))
    save_point(run_dir / "points" / "c1.json", synthetic_point("colloc", "w", 1, n=12, output_tokens=3))
    html = build_report(run_dir).read_text()
    assert html.count("cores waiting for a CPU") == 1
    assert ("c4: VLLM::EngineCore×2 1.90 / 0.02 (max 0.31), OpenAiIngress×8 0.40 / 0.00 (max 0.01), "
            "other applications 0.50 / 0.75") in html
    assert "at one core" not in html  # no process list: nothing to say


def test_a_serving_process_at_one_core_is_named():
    from pdperf.report.html import at_one_core
    procs = {"1": {"role": "pd/Decode", "cpu_cores": 0.98}, "2": {"role": "pd/OpenAiIngress", "cpu_cores": 0.38},
             "3": {"role": "pd/VLLM::EngineCore", "cpu_cores": 1.0}, "4": {"role": "RayWorker", "cpu_cores": 2.03},
             "5": {"role": "other/LLMServer", "cpu_cores": 0.99}, "6": {"role": "pd_proxy", "cpu_cores": 0.93}}
    # the engine core and TP workers step continuously at every load; another app is not this point's
    assert at_one_core({"processes": procs}, "pd") == [("Decode", 0.98), ("pd_proxy", 0.93)]
    assert at_one_core({}, "pd") == []


def test_each_topology_gets_a_chart_of_its_requests_pace_in_time(tmp_path):
    """A slow stretch within a point shows as a step of its requests' TPOT in time."""
    run_dir = tmp_path / "run-pace"
    for topo in ("colloc", "pd-1p1d"):
        for c in (1, 4):
            save_point(run_dir / "points" / f"{topo}-c{c}.json",
                       synthetic_point(topo, "w", c, n=12, output_tokens=3))
    html = build_report(run_dir).read_text()
    assert html.count("TPOT per request in time — colloc — w</title>") == 1
    assert html.count("TPOT per request in time — pd-1p1d — w</title>") == 1
    assert "seconds since the point&#x27;s first measured request" in html or \
        "seconds since the point's first measured request" in html


def test_ratio_rows_are_trimmed_to_the_ones_that_matter():
    from pdperf.report.plots import trim_ratio_rows

    rows = [RatioRow(f"m{i}", 1.0 + i / 1000, None, None, 1.5, 1 / 1.5, "unchanged") for i in range(60)]
    rows[3] = RatioRow("bad", 2.0, 1.8, 2.2, 1.5, 1 / 1.5, "regressed")
    shown, hidden = trim_ratio_rows(rows, limit=10)
    assert len(shown) == 10 and hidden == 50
    assert shown[0].label == "bad" and shown[-1].label == "m59"  # original order; largest unchanged kept


def test_report_cli(tmp_path, capsys):
    from pdperf.report.__main__ import main

    assert main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and err.count("\n") == 1


def test_estimated_server_means_are_marked_with_the_range_they_are_proven_in(tmp_path):
    # Ray's export keeps no histogram sums: queue 150 ms drawn beside a 47 ms TTFT, unmarked, misled
    run_dir = tmp_path / "run-est"
    tel = {"queue_time_s": 0.15, "prefill_time_s": 0.15, "decode_time_s": 0.6, "kv_transfer_time_s": None,
           "estimated_means": ["queue_time_s", "prefill_time_s", "decode_time_s"],
           "mean_bounds_s": {"queue_time_s": [0.0, 0.3], "prefill_time_s": [0.0, 0.3], "decode_time_s": [0.5, None]}}
    save_point(run_dir / "points" / "c1.json", synthetic_point("colloc", "w", 1, n=12, output_tokens=3, telemetry=tel))
    html = build_report(run_dir).read_text()
    assert "colloc c1 ≈" in html
    assert "queue 0 ms-300 ms, prefill 0 ms-300 ms, decode 500 ms-no upper bound" in html
    exact = tmp_path / "run-exact"
    save_point(exact / "points" / "c1.json", synthetic_point(
        "colloc", "w", 1, n=12, output_tokens=3, telemetry={"queue_time_s": 0.01, "decode_time_s": 0.5}))
    assert "estimated from histogram buckets" not in build_report(exact).read_text()


def test_engines_counting_fewer_requests_than_completed_is_said():
    from pdperf.report.html import short_windows
    short = synthetic_point("colloc-2xtp2", "w", 64, n=20, output_tokens=3, telemetry={"server_requests": 15})
    whole = synthetic_point("colloc-2xtp2", "w", 16, n=20, output_tokens=3, telemetry={"server_requests": 20})
    pd = synthetic_point("pd-1p1d", "w", 4, n=20, output_tokens=3, telemetry={"server_requests": 39})  # 2 engines each
    none = synthetic_point("colloc-2xtp2", "w", 1, n=20, output_tokens=3)
    assert [(p.point_id, n, e) for p, n, e in short_windows([short, whole, pd, none])] == [("c64", 15, 20)]
