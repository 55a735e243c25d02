"""Client ceiling: streamed tokens per client CPU-second, and the TTFT the client adds.

Why: a load generator that runs out of CPU reports its own queueing as server latency. This
measures, against the loopback *stub* server (pdperf.loadgen.stub_server; it serves nothing
real), how many streamed tokens one core of each client can take, and how much TTFT each adds
at 256 and 1024 concurrent streams, for this client and for `vllm bench serve`'s.

Method (same for both clients, runs alternated):
- the stub runs in its own process pinned to CPU 0, the client pinned to CPU 1;
- every chunk carries one token (the expensive case: one socket read per token);
- the stub's decode step clock emits one token per stream per step: "moderate" offers about
  10k tokens/s (each read holds one event: the per-token cost), "max" offers 64k tokens/s,
  more than the stub (one core) can write, so client and stub both run flat out (reads then
  hold several events, which is cheaper per token for both clients);
- both clients warm up with one request per slot (connections pooled), then send 3 requests
  per slot; each client's own per-request start/end times (both on perf_counter, which is
  system-wide) give the measured window;
- client CPU is sampled from /proc for the client's whole process tree and charged only for
  that window (imports, tokenizer, dataset building and warm-up are excluded for both);
- tokens per CPU-second = tokens streamed in the window / client CPU-seconds in the window:
  the throughput one core of that client could sustain;
- TTFT added = the client's mean TTFT - the stub's mean TTFT (50 ms; each request draws
  uniformly from 25-75 ms, seeded, so the closed-loop waves spread out instead of every slot
  restarting in the same millisecond), over all measured requests and "steady" (after the
  first wave, in which every slot starts at once). It includes the stub's own time to take
  a burst of requests (same stub for both clients).

Prints a side-by-side table with ratios; asserts nothing. Usage:
    .venv/bin/python benchmarks/client_ceiling.py [--quick] [--json out.json]
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

from _common import VENV_BIN, CpuSampler, load_json, run_with_cpu, tiny_model, vllm_bench_cmd  # noqa: E402

from pdperf.loadgen.stub_server import StubBehavior, StubServerProcess  # noqa: E402
from pdperf.results import atomic_write_json  # noqa: E402

STUB_TTFT_S = 0.05  # mean; each request's TTFT is uniform in 50 +- 25 ms so closed-loop waves spread out
STUB_TTFT_JITTER_S = 0.025
ISL = 32


def run_client(which: str, *, url: str, tok: Path, conc: int, n: int, osl: int, work: Path, client_cpu: str,
               processes: int = 1, isl: int = ISL) -> tuple[Path, object]:
    """Run one client to completion (warm-up: one request per slot) against ``url``; its result file and run."""
    out = work / f"{which}-c{conc}-{int(time.time() * 1000)}.json"
    if which == "pdperf":
        cmd = ["taskset", "-c", client_cpu, str(VENV_BIN / "python"), "-m", "pdperf.loadgen.runner",
               "--base-url", url, "--model", "stub-model", "--tokenizer", str(tok), "--isl", str(isl),
               "--osl", str(osl), "--concurrency", str(conc), "--requests", str(n), "--warmup", str(conc),
               "--processes", str(processes), "--no-cache-reset", "--output", str(out)]
    else:
        cmd = ["taskset", "-c", client_cpu, *vllm_bench_cmd(
            base_url=url, model_name="stub-model", tokenizer=tok, isl=isl, osl=osl, n=n, concurrency=conc,
            result_file=out, extra=["--num-warmups", str(conc), "--save-detailed"])]
    run = run_with_cpu(cmd, timeout_s=1800, log=work / (out.stem + ".log"))
    if run.returncode != 0:
        raise RuntimeError(f"{which} failed ({run.returncode}); log {work / (out.stem + '.log')}:\n{run.stdout[-3000:]}")
    return out, run


def per_request(which: str, result: Path) -> list[tuple[float, float, float, int]]:
    """(start s, TTFT s, end s, output tokens) of every measured request, on the shared perf_counter clock."""
    res = load_json(result)
    if which == "pdperf":
        return [(r["scheduled_s"], r["first_token_s"] - r["scheduled_s"], r["end_s"], r["output_tokens"])
                for r in res["records"] if not r["warmup"] and r["error"] is None]
    return [(st, ttft, st + lat, n) for st, ttft, lat, n, err in
            zip(res["start_times"], res["ttfts"], res["latencies"], res["output_lens"], res["errors"]) if not err]


def measure(which: str, stub_cpu: CpuSampler, *, conc: int, **kw) -> dict:
    result, run = run_client(which, conc=conc, **kw)
    reqs = sorted(per_request(which, result))
    t0, t1 = reqs[0][0], max(r[2] for r in reqs)
    cpu = run.cpu.cpu_between(t0, t1)
    tokens = sum(r[3] for r in reqs)
    window = t1 - t0
    ttfts_ms = [r[1] * 1000 for r in reqs]
    steady = ttfts_ms[conc:]  # after the first wave (all slots starting together at t0)
    queue_ms = None
    if which == "pdperf":  # the client's own hold (sent - scheduled); vllm bench does not record it
        recs = [r for r in load_json(result)["records"] if not r["warmup"] and r["sent_s"] is not None]
        queue_ms = statistics.mean((r["sent_s"] - r["scheduled_s"]) * 1000 for r in recs)
    return {"client": which, "completed": len(reqs), "tokens": tokens, "window_s": window, "client_cpu_s": cpu,
            "tok_per_s": tokens / window, "tok_per_cpu_s": tokens / cpu if cpu > 0 else None,
            "cpu_util": cpu / window, "ttft_mean_ms": statistics.mean(ttfts_ms),
            "ttft_added_ms": statistics.mean(ttfts_ms) - STUB_TTFT_S * 1000,
            "ttft_added_steady_ms": statistics.mean(steady) - STUB_TTFT_S * 1000 if steady else None,
            "ttft_added_p50_ms": statistics.median(ttfts_ms) - STUB_TTFT_S * 1000, "client_queue_mean_ms": queue_ms,
            "stub_cpu_util": stub_cpu.cpu_between(t0, t1) / window, "loadavg_1m_after": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens per request (a shorter run)")
    ap.add_argument("--json", type=Path, help="write all measurements here")
    ap.add_argument("--stub-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", default="1")
    ap.add_argument("--repeats", type=int, default=1, help="runs per client and load (alternated); medians compared")
    ap.add_argument("--concurrency", type=int, action="append", help="only these concurrencies (default 256 and 1024)")
    args = ap.parse_args()
    tok = tiny_model()
    osl = 32 if args.quick else 64
    # (concurrency, decode step s, label): offered tokens/s = concurrency / step
    loads = [(256, 0.025, "moderate"), (256, 0.004, "max"), (1024, 0.1, "moderate"), (1024, 0.016, "max")]
    loads = [x for x in loads if not args.concurrency or x[0] in args.concurrency]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdperf-ceiling-") as tmp:
        work = Path(tmp)
        for conc, step, label in loads:
            behavior = StubBehavior(ttft_s=STUB_TTFT_S, ttft_jitter_s=STUB_TTFT_JITTER_S, token_interval_s=step,
                                    prompt_tokens=ISL)
            stub = StubServerProcess(behavior, cpu=args.stub_cpu)
            with stub, CpuSampler(stub.proc.pid) as stub_cpu:  # type: ignore[union-attr]
                for rep in range(args.repeats):
                    order = ["pdperf", "vllm_bench"] if (rep + len(rows) // 2) % 2 == 0 else ["vllm_bench", "pdperf"]
                    for which in order:
                        m = measure(which, stub_cpu, url=stub.url, tok=tok, conc=conc, n=3 * conc, osl=osl,
                                    work=work, client_cpu=args.client_cpu)
                        m.update(concurrency=conc, step_ms=step * 1000, offered_tok_per_s=conc / step, load=label,
                                 repeat=rep)
                        rows.append(m)
                        print(json.dumps(m), flush=True)
    print()
    print(f"{'conc':>5} {'load':>10} {'offered':>8} | {'client':>10} {'tok/s':>7} {'tok/cpu-s':>9} {'util':>5} | "
          f"{'TTFT+ mean':>10} {'steady':>7} {'p50':>6} | {'stub util':>9}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['load']:>10} {r['offered_tok_per_s']:>8.0f} | {r['client']:>10} "
              f"{r['tok_per_s']:>7.0f} {r['tok_per_cpu_s'] or 0:>9.0f} {r['cpu_util']:>5.2f} | "
              f"{r['ttft_added_ms']:>10.1f} {r['ttft_added_steady_ms']:>7.1f} {r['ttft_added_p50_ms']:>6.1f} | "
              f"{r['stub_cpu_util']:>9.2f}")
    print(f"\nratios (pdperf / vllm bench; medians of {args.repeats} run(s) each):")

    def med(conc: int, label: str, client: str, key: str) -> float:
        return statistics.median(r[key] for r in rows
                                 if r["concurrency"] == conc and r["load"] == label and r["client"] == client)

    for conc, _step, label in loads:
        a = lambda k, c=conc, lb=label: med(c, lb, "pdperf", k)
        b = lambda k, c=conc, lb=label: med(c, lb, "vllm_bench", k)
        print(f"  c{conc} {label:>10}: tokens per CPU-second {a('tok_per_cpu_s'):.0f} vs {b('tok_per_cpu_s'):.0f} "
              f"= x{a('tok_per_cpu_s') / b('tok_per_cpu_s'):.2f}; TTFT added steady {a('ttft_added_steady_ms'):.1f} vs "
              f"{b('ttft_added_steady_ms'):.1f} ms, all requests {a('ttft_added_ms'):.1f} vs {b('ttft_added_ms'):.1f} ms")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0



if __name__ == "__main__":
    sys.exit(main())
