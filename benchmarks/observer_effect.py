"""Observer effect: CPU-seconds the client burns per 1000 streamed tokens, vs `vllm bench serve`.

Why: on a shared host (the CPU stack here, a GPU node's host cores there) every CPU-second
the client spends is taken from the server it measures; FINDINGS.md saw three clients slow
one CPU vLLM by their own CPU use. Same load for both clients, runs alternated:
128 in / 64 out, concurrency 4, 200 requests (the load of "Three clients, one server").

- ``--server stub`` (default): the loopback stub (it serves nothing real) in its own
  process on CPU 0, timed like the tiny CPU model (25 ms TTFT, 4 ms per token), clients
  on CPU 1. Measures the client's cost alone, repeatably.
- ``--server vllm``: a real ``vllm serve`` of the tiny model; also shows the server's own
  mean TPOT during each client's run (what the client's CPU use did to the server).

CPU is sampled from /proc over the client's process tree; "window" charges only the span of
the measured requests (each client's own per-request times, shared perf_counter clock);
"total" charges the whole process life (imports, tokenizer, dataset, teardown).
Asserts nothing. Usage:
    .venv/bin/python benchmarks/observer_effect.py [--server stub|vllm] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import accuracy  # noqa: E402
from _common import VllmServer, tiny_model  # noqa: E402
from client_ceiling import per_request, run_client  # noqa: E402

from pdperf.loadgen.stub_server import StubBehavior, StubServerProcess  # noqa: E402
from pdperf.results import atomic_write_json  # noqa: E402

ISL, OSL, CONC, N = 128, 64, 4, 200


def stub_run(which: str, url: str, tok: Path, work: Path, client_cpu: str) -> dict:
    result, run = run_client(which, url=url, tok=tok, conc=CONC, n=N, osl=OSL, work=work, client_cpu=client_cpu,
                             isl=ISL)
    reqs = sorted(per_request(which, result))
    t0, t1 = reqs[0][0], max(r[2] for r in reqs)
    tokens = sum(r[3] for r in reqs)
    cpu_w = run.cpu.cpu_between(t0, t1)
    return {"client": which, "tokens": tokens, "window_s": t1 - t0, "cpu_window_s": cpu_w,
            "cpu_total_s": run.total_cpu_s, "cpu_s_per_1k_tok_window": cpu_w * 1000 / tokens,
            "cpu_s_per_1k_tok_total": run.total_cpu_s * 1000 / tokens,
            "loadavg_1m_after": os.getloadavg()[0],
            "tpot_ms": statistics.mean((r[2] - r[0] - r[1]) * 1000 / (r[3] - 1) for r in reqs if r[3] > 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=["stub", "vllm"], default="stub")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client-cpu", default="1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tok = tiny_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdperf-observer-") as tmp:
        work = Path(tmp)
        if args.server == "stub":
            stub = StubServerProcess(StubBehavior(ttft_s=0.025, token_interval_s=0.004, prompt_tokens=ISL), cpu=0)
            with stub:
                for i in range(args.rounds):
                    for which in (["pdperf", "vllm_bench"] if i % 2 == 0 else ["vllm_bench", "pdperf"]):
                        row = {**stub_run(which, stub.url, tok, work, args.client_cpu), "round": i}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        else:
            with VllmServer(tok, work / "vllm.log") as srv:
                accuracy.run_one("pdperf", srv, tok, 20, work, None)  # warm the engine
                for i in range(args.rounds):
                    for which in (["pdperf", "vllm_bench"] if i % 2 == 0 else ["vllm_bench", "pdperf"]):
                        row = {**accuracy.run_one(which, srv, tok, N, work, None), "round": i}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print(f"\n{'round':>5} {'client':>10} | {'CPU-s/1k tok (window)':>21} {'(total)':>8} | {'client TPOT ms':>14}"
          + (f" {'server TPOT ms':>14}" if args.server == "vllm" else ""))
    for r in rows:
        print(f"{r['round']:>5} {r['client']:>10} | {r['cpu_s_per_1k_tok_window']:>21.4f} "
              f"{r['cpu_s_per_1k_tok_total']:>8.3f} | {r['tpot_ms']:>14.3f}"
              + (f" {r['server_tpot_ms']:>14.3f}" if args.server == "vllm" else ""))
    a = [r for r in rows if r["client"] == "pdperf"]
    b = [r for r in rows if r["client"] == "vllm_bench"]
    for key in ("cpu_s_per_1k_tok_window", "cpu_s_per_1k_tok_total"):
        ma, mb = statistics.mean(r[key] for r in a), statistics.mean(r[key] for r in b)
        print(f"{key}: pdperf {ma:.4f} vs vllm bench {mb:.4f} -> pdperf uses {ma / mb:.2f}x")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
