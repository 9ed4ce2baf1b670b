#!/usr/bin/env python3
"""Forward-pass tokens/s on CPU: dsv3-jax versus Hugging Face transformers, side by side.

    python benchmarks/forward_cpu.py                       # configs/tiny.json, batch 4, seq 128
    python benchmarks/forward_cpu.py --threads 2,1 --repeats 3 --iters 10 \\
        --transformers-python /work/fixenv/bin/python

Ours: `dsv3_jax.init_model(cfg, seed=0)` (fp32), `nnx.jit` of `model(ids)`, one warm-up call
(compile) excluded, then --iters calls each followed by `block_until_ready`. Transformers:
`benchmarks/hf_forward.py` (fp32, eager attention, eager expert loop, inference_mode, one warm-up
excluded) run with --transformers-python. Both run as fresh subprocesses, time one random
[batch, seq] batch, and print one JSON line; the runs alternate (ours, theirs, theirs, ours, ...)
over --repeats rounds and the table reports medians and the ratio ours / transformers.

Threads, for each value T of --threads: torch gets `torch.set_num_threads(T)`; JAX gets XLA's
default thread pool for T = all usable cores, and `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`
for T = 1. When T is below the usable cores both processes are also pinned to the first T cores
(sched_setaffinity), so neither can use more than T cores whatever its runtime does. Both get
`OMP_WAIT_POLICY=PASSIVE` (--omp-wait-policy; XLA does not use OpenMP): with torch's default
spin-waiting, 2 OpenMP threads on a 2-core machine shared with other work ran ~60x slower.
The 1-minute load average before and after is recorded, since other load skews every number.
Prints a table and appends a dated section to BENCHMARKS.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_section, median, side_by_side, table, usable_cores  # noqa: E402

HF_SCRIPT = ROOT / "benchmarks" / "hf_forward.py"


def jax_worker(args) -> int:
    """Time our forward in this process and print one JSON line (same keys as hf_forward.py)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dsv3_jax

    cfg = dsv3_jax.ModelConfig.from_json(args.config)
    model = dsv3_jax.init_model(cfg, seed=args.seed)
    ids = jnp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq)),
                      jnp.int32)
    forward = nnx.jit(lambda m, x: m(x))
    t0 = time.perf_counter()
    forward(model, ids).block_until_ready()  # warm-up: trace + compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        forward(model, ids).block_until_ready()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "impl": "dsv3-jax", "tokens_per_s": args.batch * args.seq * args.iters / dt,
        "ms_per_forward": 1000.0 * dt / args.iters, "first_call_s": compile_s,
        "batch": args.batch, "seq": args.seq, "iters": args.iters, "threads": args.threads,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model))),
    }))
    return 0


def run_one(impl: str, args, threads: int) -> dict:
    """One fresh subprocess of `impl` with `threads` threads; its parsed JSON line."""
    common = ["--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq),
              "--iters", str(args.iters), "--threads", str(threads)]
    return side_by_side(impl, __file__, HF_SCRIPT, args.transformers_python, common, threads,
                        args.omp_wait_policy)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10, help="timed forwards per process")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians reported")
    ap.add_argument("--threads", default=f"{usable_cores()},1", help="comma-separated thread counts")
    ap.add_argument("--transformers-python", default="/work/fixenv/bin/python")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for both ('' = unset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        return jax_worker(args)

    impls = ["ours", "transformers"]
    if not Path(args.transformers_python).exists():
        print(f"NOTE: --transformers-python {args.transformers_python} not found; reporting only ours "
              "(the venv: python3.11 + torch CPU + transformers, see benchmarks/hf_forward.py).")
        impls = ["ours"]
    thread_counts = [int(t) for t in args.threads.split(",")]

    load_before = os.getloadavg()[0]
    results = {(t, i): [] for t in thread_counts for i in impls}
    for t in thread_counts:
        for r in range(args.repeats):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                res = run_one(impl, args, t)
                results[(t, impl)].append(res)
                print(f"  {t} thread(s) round {r + 1}: {impl:12s} {res['tokens_per_s']:9.0f} tokens/s  "
                      f"{res['ms_per_forward']:8.2f} ms/forward", flush=True)

    headers = ["threads", "impl", "tokens/s (median)", "ms/forward", "tokens/s per round", "ours / transformers"]
    rows = []
    for t in thread_counts:
        med = {i: median([x["tokens_per_s"] for x in results[(t, i)]]) for i in impls}
        for impl in impls:
            runs = results[(t, impl)]
            ratio = f"{med['ours'] / med['transformers']:.2f}" if impl == "ours" and len(impls) == 2 else ""
            rows.append([t, "dsv3-jax" if impl == "ours" else "transformers", f"{med[impl]:.0f}",
                         f"{median([x['ms_per_forward'] for x in runs]):.2f}",
                         " ".join(f"{x['tokens_per_s']:.0f}" for x in runs), ratio])
    out = table(headers, rows)
    load = f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print()
    print(load)
    print(out)

    if not args.no_append:
        versions = ""
        if "transformers" in impls:
            versions = subprocess.run(
                [args.transformers_python, "-c", "import torch, transformers; "
                 "print(f'torch {torch.__version__}, transformers {transformers.__version__}')"],
                capture_output=True, text=True).stdout.strip()
            versions = f" Transformers side: {versions}, fp32, eager attention and expert loop."
        body = (f"Config `{Path(args.config).name}`, forward `model(ids)` -> fp32 logits, ids "
                f"[{args.batch}, {args.seq}], fp32 weights, {args.iters} timed forwards per fresh "
                f"process (warm-up/compile excluded), {args.repeats} alternating rounds, medians."
                f"{versions} JAX threads: XLA default pool for all cores, "
                f"`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` for 1; torch `set_num_threads(T)`; "
                f"below all cores both processes are pinned to T cores; OMP_WAIT_POLICY="
                f"{args.omp_wait_policy or 'unset'}. {load}.\n\n{out}\n")
        append_section("Forward tokens/s on CPU, dsv3-jax vs transformers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
