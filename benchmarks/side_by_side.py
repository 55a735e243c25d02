"""Same load, same server: this suite's client against `vllm bench serve`, runs alternated.

Why: a load generator whose requests or arrival pattern make the server slower than a peer
client at the same nominal load reports a server that users do not have. This benchmark
keeps one server up and alternates the two clients (and variants of this one that change
one request option at a time) over several rounds at each concurrency, and compares, per run:

- **server-side figures** from the server's own ``/metrics`` scraped right before and after
  each run: mean TTFT, TPOT, ITL, E2E, queue time, and output tokens per second
  (Δ``vllm:generation_tokens`` over the client's measured window);
- **the server's CPU**: CPU-seconds of the API-server process and of the engine process(es)
  over the run, per 1000 generated tokens (what a request option costs the server);
- **client-side figures**: each client's own mean/median TTFT and TPOT, and its mean TPOT
  against the engine's for the same requests (the accuracy target: within 2 %).

Targets (issue 19): every server-side mean under this client within the spread (min..max) of
``vllm bench serve``'s own reruns; this client's mean TPOT within 2 % of the engine's.

Variants (``--variants``), each one factor away from ``pdperf``:
  pdperf           the suite's client as the suite runs it (defaults, /metrics sampled each second)
  pdperf_old       the client before this benchmark: temperature 0 and per-chunk usage
  pdperf_t0        temperature 0 (greedy) only
  pdperf_usage     per-chunk usage (continuous_usage_stats) only
  pdperf_nosample  no /metrics sampling during the run
  bench            vllm bench serve as shipped (no temperature: the server's default), a seed of its own
                   each run
  bench_t0         vllm bench serve --temperature 0
  bench_sameseed   vllm bench serve with its default seed (0) every run, as this benchmark ran it before:
                   its random prompts repeat from run to run and vLLM's prefix cache serves them

Prompts never repeat across runs (the suite's client salts every request; `vllm bench serve` gets a
fresh ``--seed`` per run, except ``bench_sameseed``): with a repeated prompt the server skips
most of the prefill and the peer's TTFT is not the same load. Every row records the server's
prefix-cache queries and hits over the run, and the tables show the hit rate.

The server: ``--server vllm`` starts ``vllm serve MODEL`` on a free loopback port (CPU: eager,
float32; ``--server-arg`` adds arguments, e.g. the GPU's production defaults), ``--url`` uses
one that runs (a Ray Serve app: give ``--metrics-url`` for its engines). ``--short-tokenizer``
serves the model with the trained 8192-token tokenizer although its vocabulary is larger (the
GPU shapes before pdperf/models.py padded it): the detokenizer's slow path, on purpose.
``--vocab N`` serves the model with a vocabulary of N (dummy weights, the tokenizer padded to N
as pdperf/models.py pads the GPU shapes): the tiny CPU model with the GPU shapes' vocabulary.
``--detokenizer-cost`` only times vLLM's incremental detokenizer on both tokenizers and exits.

Asserts nothing; prints a table per concurrency and writes every run (``--json``).
    .venv/bin/python benchmarks/side_by_side.py --concurrency 4 16 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import VENV_BIN, VllmServer, _children, load_json, run_with_cpu, vllm_bench_cmd  # noqa: E402

from pdperf.loadgen.telemetry import summarize as telemetry_summary  # noqa: E402
from pdperf.models import TOKENIZER_VOCAB, ensure_model, pad_tokenizer_json  # noqa: E402
from pdperf.results import atomic_write_json  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "pdperf": ("pdperf", []),
    "pdperf_old": ("pdperf", ["--temperature", "0", "--per-chunk-usage"]),
    "pdperf_t0": ("pdperf", ["--temperature", "0"]),
    "pdperf_usage": ("pdperf", ["--per-chunk-usage"]),
    "pdperf_nosample": ("pdperf", ["--no-telemetry-sampling"]),
    "bench": ("bench", []),
    "bench_t0": ("bench", ["--temperature", "0"]),
    "bench_sameseed": ("bench", ["--seed", "0"]),
}
# vLLM's queue time is tens of microseconds when nothing waits: differences below this are not a finding
QUEUE_SLACK_MS = 0.5
SERVER_KEYS = ("server_ttft_ms", "server_tpot_ms", "server_itl_ms", "server_e2e_ms", "server_queue_ms",
               "server_tok_s")


def proc_cpu_s(pid: int) -> float:
    """User+system CPU seconds of one process (all its threads), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def server_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds of the API-server process and of its descendants (engine core, workers)."""
    if pid is None:
        return {}
    engine, stack = 0.0, list(_children(pid))
    while stack:
        p = stack.pop()
        engine += proc_cpu_s(p)
        stack.extend(_children(p))
    return {"api": proc_cpu_s(pid), "engine": engine}


def scrape(urls: list[str]) -> dict[str, str]:
    import urllib.request

    out = {}
    for u in urls:
        with urllib.request.urlopen(u, timeout=30) as r:
            out[u] = r.read().decode()
    return out


def _ms(v: float | None) -> float | None:
    return v * 1000.0 if v is not None else None


def run_one(variant: str, *, base_url: str, metrics_urls: list[str], served: str, tok: Path, isl: int, osl: int,
            conc: int, n: int, work: Path, server_pid: int | None, client_cpu: str | None) -> dict:
    client, extra = VARIANTS[variant]
    out = work / f"{variant}-c{conc}-{time.time_ns()}.json"
    if client == "pdperf":
        cmd = [str(VENV_BIN / "python"), "-m", "pdperf.loadgen.runner", "--base-url", base_url, "--model", served,
               "--tokenizer", str(tok), "--isl", str(isl), "--osl", str(osl), "--concurrency", str(conc),
               "--requests", str(n), "--processes", "1", "--no-cache-reset", "--output", str(out), *extra]
        for u in metrics_urls:  # as the suite runs: its own scrapes (and 1 s sampling unless told otherwise)
            cmd += ["--metrics-url", u]
    else:
        # vllm bench's random prompts come from its --seed (default 0): one seed for every run would
        # send the same prompts again, and the prefix cache would serve their prefill
        seed = [] if "--seed" in extra else ["--seed", str(time.time_ns() % 2**31)]
        cmd = vllm_bench_cmd(base_url=base_url, model_name=served, tokenizer=tok, isl=isl, osl=osl, n=n,
                             concurrency=conc, result_file=out, extra=[*extra, *seed])
    if client_cpu:
        cmd = ["taskset", "-c", client_cpu, *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cpu0, before = server_cpu(server_pid), scrape(metrics_urls)
    run = run_with_cpu(cmd, env=env, timeout_s=1800, log=work / (out.stem + ".log"))
    after, cpu1 = scrape(metrics_urls), server_cpu(server_pid)
    if run.returncode != 0 or not out.exists():
        raise RuntimeError(f"{variant} failed ({run.returncode}):\n{run.stdout[-3000:]}")
    srv = telemetry_summary(before, after)
    res = load_json(out)
    if client == "pdperf":
        m, s = res["summary"]["metrics"], res["summary"]
        row = {"ok": s["requests_ok"], "failed": s["requests_failed"], "window_s": res["duration_s"],
               "ttft_ms": m["ttft_ms"]["mean"], "ttft_p50_ms": m["ttft_ms"]["p50"],
               "tpot_ms": m["tpot_ms"]["mean"], "tpot_p50_ms": m["tpot_ms"]["p50"],
               "tok_s": s["throughput"]["output_tok_per_s"],
               "client_cpu_s": res["client"]["cpu_s"], "accounting": res["client"]["token_accounting"]}
    else:
        row = {"ok": res["completed"], "failed": res.get("failed", n - res["completed"]), "window_s": res["duration"],
               "ttft_ms": res["mean_ttft_ms"], "ttft_p50_ms": res["median_ttft_ms"],
               "tpot_ms": res["mean_tpot_ms"], "tpot_p50_ms": res["median_tpot_ms"],
               "tok_s": res["output_throughput"], "client_cpu_s": None, "accounting": None}
    gen = srv.get("generation_tokens")
    row.update({
        "variant": variant, "client": client, "concurrency": conc, "requests": n,
        "server_ttft_ms": _ms(srv.get("server_ttft_mean_s")), "server_tpot_ms": _ms(srv.get("server_tpot_mean_s")),
        "server_itl_ms": _ms(srv.get("server_itl_mean_s")), "server_e2e_ms": _ms(srv.get("server_e2e_mean_s")),
        "server_queue_ms": _ms(srv.get("queue_time_s")), "server_requests": srv.get("server_requests"),
        "server_gen_tokens": gen, "server_tok_s": (gen / row["window_s"]) if gen and row["window_s"] else None,
        "server_means_estimated": srv.get("estimated_means"),
        "server_prefix_cache_queries": srv.get("prefix_cache_queries"),
        "server_prefix_cache_hits": srv.get("prefix_cache_hits"),
        "server_prefix_cache_hit_rate": srv.get("prefix_cache_hit_rate"),
        "api_cpu_s": (cpu1["api"] - cpu0["api"]) if cpu0 else None,
        "engine_cpu_s": (cpu1["engine"] - cpu0["engine"]) if cpu0 else None,
        "client_wall_s": run.wall_s, "client_tree_cpu_s": run.total_cpu_s,
    })
    if row["api_cpu_s"] is not None and gen:
        row["api_cpu_s_per_1k_tok"] = row["api_cpu_s"] * 1000.0 / gen
    row["tpot_vs_engine"] = (row["tpot_ms"] / row["server_tpot_ms"]) if row["server_tpot_ms"] else None
    return row


def detokenizer_cost(model: Path) -> None:
    """µs per output token of vLLM's incremental detokenizer (tokenizers' DecodeStream) on ids
    drawn over the model's whole vocabulary, with the padded tokenizer and the short one."""
    import tokenizers.decoders
    from tokenizers import Tokenizer

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompt = [rng.randrange(3, TOKENIZER_VOCAB) for _ in range(1024)]
    short = short_tokenizer_json(model)
    for name, tok in (("padded (every id has text)", Tokenizer.from_file(str(model / "tokenizer.json"))),
                      (f"short ({TOKENIZER_VOCAB} of {vocab} ids have text)", Tokenizer.from_str(short))):
        for label, ids in (("uniform ids (temperature 1)", [rng.randrange(0, vocab) for _ in range(256)]),
                           ("one repeated id (greedy on dummy weights)", [vocab - 7] * 256)):
            stream = tokenizers.decoders.DecodeStream(ids=prompt, skip_special_tokens=True)
            t0 = time.perf_counter()
            for i in ids:
                stream.step(tok, i)
            print(f"{name:<40} {label:<44} {(time.perf_counter() - t0) / len(ids) * 1e6:8.1f} us/token")


def short_tokenizer_json(model: Path) -> str:
    """The model's tokenizer.json without the padding: only the trained vocabulary has text."""
    data = json.loads((model / "tokenizer.json").read_text())
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < TOKENIZER_VOCAB}
    return json.dumps(data)


def with_short_tokenizer(model: Path, work: Path) -> Path:
    dest = work / (model.name + "-short-tokenizer")
    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for w in list(model.glob("*.safetensors")) + list(model.glob("*.bin")):
        (dest / w.name).symlink_to(w)
    (dest / "tokenizer.json").write_text(short_tokenizer_json(model))
    return dest


def with_vocab(model: Path, vocab: int, work: Path) -> Path:
    """``model``'s config with ``vocab_size`` = ``vocab``, no weights (dummy), its tokenizer padded to it."""
    dest = work / f"{model.name}-vocab{vocab}"
    dest.mkdir()
    for f in model.iterdir():
        if f.suffix == ".json" and f.name not in ("config.json", "tokenizer.json"):
            shutil.copy(f, dest / f.name)
    cfg = json.loads((model / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}))
    tok = pad_tokenizer_json(json.loads((model / "tokenizer.json").read_text()), vocab)
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


def spread(rows: list[dict], key: str) -> tuple[float, float] | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return (min(vals), max(vals)) if vals else None


def report(rows: list[dict]) -> None:
    cols = ("server_ttft_ms", "server_tpot_ms", "server_itl_ms", "server_e2e_ms", "server_tok_s", "api_cpu_s_per_1k_tok",
            "ttft_ms", "tpot_ms", "tpot_vs_engine", "server_prefix_cache_hit_rate")
    for conc in sorted({r["concurrency"] for r in rows}):
        at = [r for r in rows if r["concurrency"] == conc]
        print(f"\n== concurrency {conc}: mean [min..max] over runs")
        print(f"{'variant':<16} {'runs':>4} " + " ".join(f"{c:>24}" for c in cols))
        for v in dict.fromkeys(r["variant"] for r in at):
            rs = [r for r in at if r["variant"] == v]
            cells = []
            for c in cols:
                vals = [r[c] for r in rs if r.get(c) is not None]
                cells.append(f"{statistics.mean(vals):9.3f} [{min(vals):6.2f}..{max(vals):6.2f}]" if vals else "-")
            print(f"{v:<16} {len(rs):>4} " + " ".join(f"{x:>24}" for x in cells))
        bench = [r for r in at if r["variant"] == "bench"]
        for v in dict.fromkeys(r["variant"] for r in at if r["client"] == "pdperf"):
            rs = [r for r in at if r["variant"] == v]
            outside = []
            for k in SERVER_KEYS:
                sp = spread(bench, k)
                if sp is None:
                    continue
                lo, hi = sp
                mean = statistics.mean(r[k] for r in rs if r.get(k) is not None)
                slack = QUEUE_SLACK_MS if k == "server_queue_ms" else 0.0
                if not lo - slack <= mean <= hi + slack:
                    outside.append(f"{k} {mean:.2f} outside bench {lo:.2f}..{hi:.2f}")
            ratios = [r["tpot_vs_engine"] for r in rs if r.get("tpot_vs_engine")]
            worst = max((abs(x - 1) for x in ratios), default=None)
            print(f"  {v}: server figures within bench's reruns: {'yes' if not outside else 'NO: ' + '; '.join(outside)}; "
                  f"client mean TPOT vs engine worst {worst * 100 if worst is not None else float('nan'):.2f} %")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="a pdperf.models key or a model folder")
    ap.add_argument("--url", help="use this running server (OpenAI base URL) instead of starting vllm serve")
    ap.add_argument("--metrics-url", action="append", default=[], help="with --url: the engines' /metrics")
    ap.add_argument("--served-name", default=None, help="the model name requests carry (default: vllm serve's)")
    ap.add_argument("--server-arg", action="append", default=[], help="more `vllm serve` arguments (repeatable)")
    ap.add_argument("--server-cpu", default=None, help="taskset CPU list for vllm serve, e.g. 0")
    ap.add_argument("--client-cpu", default=None, help="taskset CPU list for the clients, e.g. 1")
    ap.add_argument("--short-tokenizer", action="store_true", help="serve with the unpadded 8192-token tokenizer")
    ap.add_argument("--vocab", type=int, default=None, help="serve the model with this vocabulary (dummy weights)")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--requests-per-concurrency", type=int, default=8)
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="pdperf,bench", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--warmup-requests", type=int, default=16, help="sent once through vllm bench before round 1")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--deadline-s", type=float, default=None, help="stop starting runs after this many seconds")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: the API-server process (its CPU)")
    ap.add_argument("--prepare", type=Path, default=None,
                    help="write the short-tokenizer and the padded model folders into this folder, print them; exit")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--detokenizer-cost", action="store_true", help="time the detokenizer on both tokenizers; exit")
    ap.add_argument("--report", type=Path, nargs="+", default=None, help="print the tables of earlier --json files; exit")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"side_by_side: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.report:
        report([row for f in args.report for row in load_json(f)])
        return 0
    t_start = time.monotonic()
    model = ensure_model(args.model)
    if args.detokenizer_cost:
        detokenizer_cost(model)
        return 0
    if args.prepare:
        args.prepare.mkdir(parents=True, exist_ok=True)
        for old in args.prepare.iterdir():
            shutil.rmtree(old)
        base = with_vocab(model, args.vocab, args.prepare) if args.vocab else model
        print(with_short_tokenizer(base, args.prepare))
        print(base)
        return 0
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pdperf-side-by-side-") as tmp:
        work = Path(tmp)
        base_model = with_vocab(model, args.vocab, work) if args.vocab else model
        served_model = with_short_tokenizer(base_model, work) if args.short_tokenizer else base_model
        server = None
        if args.url:
            base_url, metrics, pid = args.url.rstrip("/"), list(args.metrics_url), args.server_pid
            served = args.served_name or "default"
        else:
            extra = tuple(args.server_arg) or ("--enforce-eager", "--dtype", "float32")
            if not any(f.endswith("safetensors") for f in os.listdir(served_model)):
                extra += ("--load-format", "dummy")
            server = VllmServer(served_model, work / "vllm.log", extra_args=extra, cpu_list=args.server_cpu,
                                startup_timeout_s=args.startup_timeout)
            t0 = time.monotonic()
            server.__enter__()
            print(f"vllm serve ready in {time.monotonic() - t0:.0f} s", flush=True)
            base_url, metrics, pid, served = server.url, [server.url + "/metrics"], server.proc.pid, "tiny"
        try:
            common = dict(base_url=base_url, metrics_urls=metrics, served=served, tok=served_model, isl=args.isl,
                          osl=args.osl, work=work, server_pid=pid, client_cpu=args.client_cpu)
            if args.warmup_requests:
                run_one("bench", conc=min(args.concurrency), n=args.warmup_requests, **common)
            for rnd in range(args.rounds):
                for conc in args.concurrency:
                    n = max(args.requests_per_concurrency * conc, args.min_requests)
                    order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]  # rotate: no fixed position
                    for v in order:
                        if args.deadline_s and time.monotonic() - t_start > args.deadline_s:
                            print("side_by_side: deadline reached; stopping", flush=True)
                            raise StopIteration
                        row = run_one(v, conc=conc, n=n, **common)
                        row["round"] = rnd
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.json:
                            atomic_write_json(args.json, rows)
        except StopIteration:
            pass
        finally:
            if server is not None:
                server.close()
                if args.json:
                    shutil.copy(work / "vllm.log", args.json.with_suffix(".server.log"))
    report(rows)
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
