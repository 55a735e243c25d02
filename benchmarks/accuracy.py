"""Accuracy: does the client measure what the server itself measured, in the same window?

Why: a client's TPOT and TTFT are only worth reporting if they agree with the engine's own
clock on the same requests. vLLM keeps per-request histograms on ``/metrics``; scraping them
right before and right after a client run gives the server's means for exactly that run.

Against a real CPU-stack server (``vllm serve <tiny model> --enforce-eager``, free loopback
port, ``VLLM_CPU_KVCACHE_SPACE=1``), at the load of FINDINGS.md "Three clients, one server"
(128 in / 64 out, concurrency 4, 200 requests), runs alternated between this client and
``vllm bench serve``, it prints per run and per client:

- mean TPOT client / server (server: ``vllm:request_time_per_output_token_seconds``; the
  token-weighted ``vllm:inter_token_latency_seconds`` is shown too),
- mean TTFT client - server (ms), and mean E2E client - server (ms),
- the client's CPU-seconds per 1000 streamed tokens in its measured window and over its whole
  process life (the observer effect on a 2-core machine).

Asserts nothing. Usage:
    .venv/bin/python benchmarks/accuracy.py [--rounds 2] [--requests 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import VENV_BIN, VllmServer, load_json, run_with_cpu, tiny_model, vllm_bench_cmd  # noqa: E402

from pdperf.loadgen.telemetry import summarize as telemetry_summary  # noqa: E402
from pdperf.results import atomic_write_json  # noqa: E402

ISL, OSL, CONC = 128, 64, 4


def run_one(which: str, srv: VllmServer, tok: Path, n: int, work: Path, client_cpu: str | None) -> dict:
    out = work / f"{which}-{int(time.time() * 1000)}.json"
    if which == "pdperf":
        cmd = [str(VENV_BIN / "python"), "-m", "pdperf.loadgen.runner", "--base-url", srv.url, "--model", "tiny",
               "--tokenizer", str(tok), "--isl", str(ISL), "--osl", str(OSL), "--concurrency", str(CONC),
               "--requests", str(n), "--processes", "1", "--output", str(out)]
    else:
        cmd = vllm_bench_cmd(base_url=srv.url, model_name="tiny", tokenizer=tok, isl=ISL, osl=OSL, n=n,
                             concurrency=CONC, result_file=out)
    if client_cpu:
        cmd = ["taskset", "-c", client_cpu, *cmd]
    before = srv.metrics_text()
    run = run_with_cpu(cmd, timeout_s=1800, log=work / (out.stem + ".log"))
    after = srv.metrics_text()
    if run.returncode != 0:
        raise RuntimeError(f"{which} failed ({run.returncode}):\n{run.stdout[-3000:]}")
    server = telemetry_summary({"s": before}, {"s": after})
    res = load_json(out)
    if which == "pdperf":
        m = res["summary"]["metrics"]
        measured = [r for r in res["records"] if not r["warmup"]]
        t0, t1 = min(r["scheduled_s"] for r in measured), max(r["end_s"] for r in measured if r["end_s"])
        client = {"tpot_ms": m["tpot_ms"]["mean"], "ttft_ms": m["ttft_ms"]["mean"], "e2e_ms": m["e2e_ms"]["mean"],
                  "tpot_p50_ms": m["tpot_ms"]["p50"], "ttft_p50_ms": m["ttft_ms"]["p50"],
                  "ok": res["summary"]["requests_ok"], "tokens": sum(r["output_tokens"] for r in measured)}
    else:
        t0 = run.line_time("Starting main benchmark run")
        t1 = run.line_time("Serving Benchmark Result")
        client = {"tpot_ms": res["mean_tpot_ms"], "ttft_ms": res["mean_ttft_ms"], "e2e_ms": res["mean_e2el_ms"],
                  "tpot_p50_ms": res["median_tpot_ms"], "ttft_p50_ms": res["median_ttft_ms"],
                  "ok": res["completed"], "tokens": res["total_output_tokens"]}
    window_cpu = run.cpu.cpu_between(t0, t1) if (t0 and t1) else None
    row = {
        "client": which, **client,
        "server_tpot_ms": _ms(server["server_tpot_mean_s"]), "server_itl_ms": _ms(server["server_itl_mean_s"]),
        "server_ttft_ms": _ms(server["server_ttft_mean_s"]), "server_e2e_ms": _ms(server["server_e2e_mean_s"]),
        "server_requests": server["server_requests"],
        "window_s": (t1 - t0) if (t0 and t1) else None,
        "cpu_window_s": window_cpu, "cpu_total_s": run.total_cpu_s, "wall_total_s": run.wall_s,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    row["tpot_ratio"] = row["tpot_ms"] / row["server_tpot_ms"]
    row["ttft_diff_ms"] = row["ttft_ms"] - row["server_ttft_ms"]
    row["e2e_diff_ms"] = row["e2e_ms"] - row["server_e2e_ms"]
    row["cpu_s_per_1k_tok_window"] = window_cpu * 1000 / row["tokens"] if window_cpu is not None else None
    row["cpu_s_per_1k_tok_total"] = run.total_cpu_s * 1000 / row["tokens"]
    return row


def _ms(v: float | None) -> float | None:
    return v * 1000.0 if v is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--client-cpu", default=None, help="taskset CPU list for the clients (default: unpinned)")
    args = ap.parse_args()
    tok = tiny_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdperf-accuracy-") as tmp:
        work = Path(tmp)
        with VllmServer(tok, work / "vllm.log") as srv:
            # warm the engine (first batches are slower), outside every measured window
            run_one("pdperf", srv, tok, 20, work, args.client_cpu)
            for i in range(args.rounds):
                order = ["pdperf", "vllm_bench"] if i % 2 == 0 else ["vllm_bench", "pdperf"]
                for which in order:
                    row = run_one(which, srv, tok, args.requests, work, args.client_cpu)
                    row["round"] = i
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'round':>5} {'client':>10} | {'TPOT c/s':>8} {'TTFT c-s ms':>11} {'E2E c-s ms':>10} | "
          f"{'TPOT ms':>7} {'srv TPOT':>8} {'srv ITL':>7} {'TTFT ms':>7} | {'cpu/1k win':>10} {'cpu/1k all':>10}")
    for r in rows:
        print(f"{r['round']:>5} {r['client']:>10} | {r['tpot_ratio']:>8.4f} {r['ttft_diff_ms']:>11.2f} "
              f"{r['e2e_diff_ms']:>10.2f} | {r['tpot_ms']:>7.3f} {r['server_tpot_ms']:>8.3f} {r['server_itl_ms']:>7.3f} "
              f"{r['ttft_ms']:>7.2f} | {r['cpu_s_per_1k_tok_window'] or float('nan'):>10.4f} "
              f"{r['cpu_s_per_1k_tok_total']:>10.4f}")
    print("\nmeans over rounds:")
    for which in ("pdperf", "vllm_bench"):
        rs = [r for r in rows if r["client"] == which]
        print(f"  {which:>10}: TPOT client/server {statistics.mean(r['tpot_ratio'] for r in rs):.4f}, "
              f"TTFT client-server {statistics.mean(r['ttft_diff_ms'] for r in rs):.2f} ms, "
              f"CPU-s per 1k tokens (window) {statistics.mean(r['cpu_s_per_1k_tok_window'] for r in rs):.4f}, "
              f"client TPOT {statistics.mean(r['tpot_ms'] for r in rs):.3f} ms")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
