#!/usr/bin/env python3
"""The HTTP server under load on CPU: throughput and time to first token, without and with
prefix caching and chunked prefill, in one run.

    python benchmarks/serve_load.py             # configs/tiny.json, random weights, ~10 minutes
    python benchmarks/serve_load.py --smoke --out /tmp/bench.md   # the code path, < 2 minutes

Each engine configuration gets its own server process (the library's Engine + OpenAI API +
uvicorn, as serve.py builds them; `Engine.precompile()` before the load, the compile shared
through a persistent JAX compilation cache, then one untimed pass of the workload on other
random tokens for what compiles on first use), then one load generator (asyncio + aiohttp,
streaming completions parsed as vLLM's benchmark client parses them) sends the same workload to
each, in this order, --rounds times:
  (a) `prefix_cache=False, prefill_chunk=None`: every prompt prefilled in full, at once;
  (b) prefix caching, whole-prompt prefill;
  (c) prefix caching + chunked prefill (`--chunk` tokens per scheduler step).
The workload: --groups shared contexts of --shared tokens, each continued by --per-group short
streams (a unique --suffix-token tail, --new greedy tokens: chat turns after one system prompt,
lm-eval continuations of one context), and --long prompts of --long-len unique tokens, all
arriving on one fixed Poisson schedule of --rate requests/s (the long ones spread through it).
Reported per configuration (pooled over rounds): requests/s and output tokens/s over the span
from the first request to the last response; time to first token p50 / p90 over all requests
and over the short streams; the inter-token gap p99 of the short streams (a stall while another
prompt is prefilled shows here); the prefix cache's hit rate. The greedy tokens of every
request must be identical across the configurations (the run fails otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_section, device_line, table  # noqa: E402

CONFIGS = {"a": ("no prefix caching, whole prompts", dict(prefix_cache=False, chunk=False)),
           "b": ("prefix caching, whole prompts", dict(prefix_cache=True, chunk=False)),
           "c": ("prefix caching + chunked prefill", dict(prefix_cache=True, chunk=True))}
FULL = dict(max_seq_len=512, max_batch=8, chunk=64, groups=3, per_group=8, shared=192, suffix=16,
            new=24, long=4, long_len=448, long_new=8, rate=6.0, rounds=2)
SMOKE = dict(max_seq_len=128, max_batch=4, chunk=16, groups=2, per_group=3, shared=40, suffix=6,
             new=6, long=1, long_len=90, long_new=4, rate=20.0, rounds=1)


# -- the server (its own process) ----------------------------------------------------------------

def server_worker(args) -> None:
    """Serve one configuration on a free port; print {"port", "compile_s", "programs"}."""
    from dsv3_jax import ModelConfig, init_model
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.engine import Engine
    from dsv3_jax.serve.http import Limits, Server

    cfg = ModelConfig.from_json(ROOT / args.config)
    opts = CONFIGS[args.engine][1]
    engine = Engine(init_model(cfg, seed=0), max_seq_len=args.max_seq_len, max_batch=args.max_batch,
                    speculative=False, prefix_cache=opts["prefix_cache"],
                    prefill_chunk=args.chunk if opts["chunk"] else None)
    t0 = time.perf_counter()
    programs = engine.precompile(echo=False)  # the load asks for no prompt logprobs
    compile_s = time.perf_counter() - t0
    engine.start()
    server = Server(OpenAIAPI(engine, model_name="tiny"), "127.0.0.1", 0,
                    limits=Limits(drain_seconds=1.0), log=lambda m: None).start()
    print(json.dumps({"port": server.server_port, "compile_s": compile_s, "programs": programs}),
          flush=True)
    sys.stdin.read()  # serve until the load generator closes our stdin (or exits)
    server.shutdown()
    engine.shutdown()


class ServerProcess:
    """`server_worker` in a subprocess; its stdin open while it should serve."""

    def __init__(self, args, engine: str, cache_dir: str):
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", engine, "--config", args.config, "--max-seq-len",
               str(args.max_seq_len), "--max-batch", str(args.max_batch), "--chunk", str(args.chunk)]
        self.proc = subprocess.Popen(cmd,
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("{"):
            self.proc.kill()
            self.log.seek(0)
            raise SystemExit(f"server ({engine}) did not start:\n{self.log.read()[-3000:]}")
        self.info = json.loads(line)
        self.url = f"http://127.0.0.1:{self.info['port']}"

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- the workload and the load generator ---------------------------------------------------------

def workload(args, vocab: int, seed: int) -> list[dict]:
    """The requests in arrival order: {"at" (s), "prompt", "max_tokens", "kind"}."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(2, vocab, n).tolist()  # noqa: E731
    short = [{"prompt": ctx + tokens(args.suffix), "max_tokens": args.new, "kind": "short"}
             for ctx in (tokens(args.shared) for _ in range(args.groups)) for _ in range(args.per_group)]
    short = [short[i] for i in rng.permutation(len(short))]
    longs = [{"prompt": tokens(args.long_len), "max_tokens": args.long_new, "kind": "long"}
             for _ in range(args.long)]
    reqs = list(short)
    for i, r in enumerate(longs):  # spread through the schedule, after the first few streams
        reqs.insert(min(len(reqs), 3 + (i + 1) * len(short) // (args.long + 1)), r)
    at = np.cumsum(rng.exponential(1.0 / args.rate, len(reqs)))
    for r, t in zip(reqs, at - at[0]):
        r["at"] = float(t)
    return reqs


async def one_request(session, url: str, req: dict, t_start: float) -> dict:
    """Send at its arrival time; read the stream as vLLM's benchmark client does."""
    await asyncio.sleep(max(0.0, t_start + req["at"] - time.perf_counter()))
    body = {"model": "tiny", "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0.0, "repetition_penalty": 1.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out = {"kind": req["kind"], "ttft": None, "gaps": [], "ids": [], "tokens": 0}
    sent = last = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            line = line.strip().decode().removeprefix("data: ")
            if not line or line == "[DONE]":
                continue
            data = json.loads(line)
            assert "error" not in data, data
            now = time.perf_counter()
            if data.get("choices") and data["choices"][0]["token_ids"]:
                if out["ttft"] is None:
                    out["ttft"] = now - sent
                else:
                    out["gaps"].append(now - last)
                last = now
                out["ids"] += data["choices"][0]["token_ids"]
            if data.get("usage"):
                out["tokens"] = data["usage"]["completion_tokens"]
    out["end"] = time.perf_counter()
    return out


async def run_load(url: str, reqs: list[dict]) -> tuple[list[dict], float]:
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(session, url, r, t0) for r in reqs))
    return list(results), max(r["end"] for r in results) - t0


def engine_stats(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())["engine"]


def pct(xs, q):
    import numpy as np
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small shapes and load (a code-path test)")
    ap.add_argument("--config", default="configs/tiny.json")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to append to "
                    "(default BENCHMARKS.md; --smoke writes only with --out)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, v in (SMOKE if args.smoke else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        args.engine = args.worker
        server_worker(args)
        return 0

    from dsv3_jax import ModelConfig
    vocab = ModelConfig.from_json(ROOT / args.config).vocab_size
    load_before, t_all = os.getloadavg()[0], time.perf_counter()
    per = {k: {"results": [], "spans": [], "compile": [], "programs": 0, "hits": 0, "queries": 0}
           for k in CONFIGS}
    tokens_by_config = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as cache_dir:
        for rnd in range(args.rounds):
            reqs, warmup = workload(args, vocab, seed=rnd), workload(args, vocab, seed=1000 + rnd)
            for key in CONFIGS:
                server = ServerProcess(args, key, cache_dir)
                try:
                    # untimed: the same load on other tokens compiles what precompile left to
                    # first use (the prefills after reused prefixes); it shares no prefix with
                    # the timed load
                    asyncio.run(run_load(server.url, warmup))
                    before = engine_stats(server.url)
                    results, span = asyncio.run(run_load(server.url, reqs))
                    stats = {k: v - before[k] for k, v in engine_stats(server.url).items()
                             if k.startswith("prefix_cache")}
                finally:
                    server.stop()
                p = per[key]
                p["results"] += results
                p["spans"].append((span, len(results), sum(r["tokens"] for r in results)))
                p["compile"].append(server.info["compile_s"])
                p["programs"] = server.info["programs"]
                p["hits"] += stats["prefix_cache_hit_tokens"]
                p["queries"] += stats["prefix_cache_query_tokens"]
                tokens_by_config[key].append([r["ids"] for r in results])
                print(f"round {rnd + 1} ({key}) {CONFIGS[key][0]}: {len(results)} requests in "
                      f"{span:.1f} s", flush=True)
    base = tokens_by_config["a"]
    for key in CONFIGS:
        if tokens_by_config[key] != base:
            raise SystemExit(f"configuration ({key}) generated other greedy tokens than (a)")
    rows = []
    for key, (name, _) in CONFIGS.items():
        p = per[key]
        res = p["results"]
        short = [r for r in res if r["kind"] == "short"]
        span = sum(s for s, _, _ in p["spans"])
        rows.append([f"({key}) {name}", f"{sum(n for _, n, _ in p['spans']) / span:.2f}",
                     f"{sum(t for _, _, t in p['spans']) / span:.1f}",
                     f"{1e3 * pct([r['ttft'] for r in res], 50):.0f}",
                     f"{1e3 * pct([r['ttft'] for r in res], 90):.0f}",
                     f"{1e3 * pct([r['ttft'] for r in short], 50):.0f}",
                     f"{1e3 * pct([r['ttft'] for r in short], 90):.0f}",
                     f"{1e3 * pct([g for r in short for g in r['gaps']], 99):.0f}",
                     f"{p['hits'] / max(1, p['queries']):.2f}",
                     f"{p['programs']} in {max(p['compile']):.0f} s"])
    headers = ["engine", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p90 ms", "short TTFT p50 ms",
               "short TTFT p90 ms", "short gap p99 ms", "prefix hit rate", "precompiled"]
    t = table(headers, rows)
    print(t)
    n_req = args.groups * args.per_group + args.long
    desc = (f"`{Path(args.config).name}`, random fp32 weights, `Engine(max_seq_len={args.max_seq_len}, "
            f"max_batch={args.max_batch}, speculative=False)` behind the HTTP server, one process "
            f"per configuration; chunked prefill: {args.chunk} tokens per step. Workload ({n_req} "
            f"requests per round, {args.rounds} rounds pooled, Poisson arrivals at {args.rate:g}/s): "
            f"{args.groups} shared contexts of {args.shared} tokens, each continued by "
            f"{args.per_group} streams (+{args.suffix} unique tokens, {args.new} greedy tokens), and "
            f"{args.long} prompts of {args.long_len} unique tokens ({args.long_new} tokens) among "
            f"them. Greedy tokens identical across the configurations: yes. Precompiled: "
            f"`Engine.precompile()`'s programs and its longest time (a process after the first "
            f"loads what an earlier one compiled from the shared cache).")
    load = (f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"{time.perf_counter() - t_all:.0f} s in all")
    print(load)
    if not args.no_write and (args.out or not args.smoke):
        body = ("Smoke shapes: a test of the code path, not a measurement.\n\n" if args.smoke else "")
        append_section("Serving under load (HTTP, CPU): prefix caching and chunked prefill",
                       f"{body}{desc}\n\n{t}\n\n{load}.\n", path=args.out or ROOT / "BENCHMARKS.md")
    else:
        print(device_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
