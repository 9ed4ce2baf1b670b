#!/usr/bin/env python3
"""Routed experts' speed on CPU: dsv3-jax vs PyTorch/transformers, side by side, 16/64/256 experts.

    python benchmarks/moe_speed.py                        # configs/moe-64e.json at 16, 64, 256 experts
    python benchmarks/moe_speed.py --experts 64 --repeats 3 --no-append
    python benchmarks/moe_speed.py --kernels blas,ours    # ours on each grouped-matmul kernel

The model is configs/moe-64e.json (49M parameters at 64 experts: V3-shaped, 8 layers of which
1 dense, top-6 of 8 groups with 4 kept, one shared expert, no MTP) with `n_routed_experts`
replaced. For each expert count, fresh processes of ours and of
benchmarks/hf_train_step.py (transformers' DeepseekV3ForCausalLM, fp32, eager attention, its
default grouped_mm experts, `torch.optim.AdamW`; run with --transformers-python, a Python 3.11
venv as for the fixtures) alternate over --repeats rounds, each timing:
  - forward: `model(ids)` on [batch, seq] ids (median of --iters after a warm-up); ours jitted
    as the serving engine does (jax.jit of the split state);
  - step: forward + next-token cross entropy + backward + clipping at 1.0 + AdamW; ours is
    `dsv3_jax.train.step.train_step` with `train.optimizer.make_optimizer`, model and optimizer
    donated (what train.py runs, `--mtp-lambda 0`; its balance term is the only extra work);
  - MoE layer: forward + backward of one MoE layer on [1, --moe-tokens, hidden] (best of --iters).
Threads as in benchmarks/forward_cpu.py: all usable cores by default (XLA's pool; torch
`set_num_threads`), both processes pinned to the first T cores when --threads is smaller; torch
with its default OpenMP settings (OMP_WAIT_POLICY=PASSIVE, used here before 2026-12-01 22:00,
made its step 1.6-1.9x slower on a quiet machine). Ours as train.py runs: glibc malloc keeps
freed memory (dsv3_jax/host_memory.py; no gain for torch when given the same settings).
The table gives medians over rounds, tokens/s, achieved GFLOP/s (6 x activated matmul parameters
+ attention per token, dsv3_jax/train/flops.py; forward a third of it) next to this machine's
measured fp32 matmul peak (best of jnp.dot on 2048 x 2048), ours / PyTorch speed ratios (> 1:
we are faster) and the MoE layer's time at each expert count relative to 16 experts.
Ours runs the routed experts on the platform's grouped-matmul kernel (dsv3_jax/layers/
platform_gmm.py: on CPU the BLAS custom call of cpu_gmm.py, else the tile loop); --kernels times
each named kernel as its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_section, median, side_by_side, table, timed, usable_cores  # noqa: E402

HF_SCRIPT = ROOT / "benchmarks" / "hf_train_step.py"


def jax_worker(args) -> int:
    """Time our forward, training step and MoE layer (on --kernel); print one JSON line."""
    from dsv3_jax.host_memory import keep_freed_memory
    keep_freed_memory()  # as train.py and serve.py, before JAX starts
    from dsv3_jax.layers import platform_gmm
    with platform_gmm.implementation(args.kernel or None):  # traced inside: the kernel used
        return _time_ours(args)


def _time_ours(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dsv3_jax
    from dsv3_jax.layers.moe import MoE
    from dsv3_jax.train.flops import flops_per_token
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.step import train_step

    cfg = dsv3_jax.ModelConfig.from_json(args.config)
    model = dsv3_jax.init_model(cfg, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    result = {"impl": "dsv3-jax", "params": sum(int(np.prod(x.shape)) for x in
                                                 jax.tree.leaves(nnx.state(model, nnx.Param))),
              "flops_per_token": flops_per_token(cfg, args.seq)}

    # as the serving engine calls the model (dsv3_jax/serve/steps.py): jax.jit of the split
    # state; nnx.jit(lambda m, x: m(x)) costs ~15% more CPU at 64 experts (its state handling)
    model_graph, model_state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(model_graph, s)(x))
    result["forward_s"] = median(timed(
        lambda: jax.block_until_ready(forward(model_state, ids[:, :-1])), args.iters))

    optimizer = nnx.Optimizer(model, make_optimizer(model), wrt=nnx.Param)
    step = nnx.jit(lambda m, o, b: train_step(m, o, b, mtp_lambda=0.0), donate_argnums=(0, 1))
    result["step_s"] = median(timed(
        lambda: jax.block_until_ready(step(model, optimizer, ids[None])), args.iters))

    moe = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(moe)
    state = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape, np.float32) * 0.02),
                         state)
    x = jnp.asarray(rng.standard_normal((1, args.moe_tokens, cfg.hidden_size), np.float32))
    layer = jax.jit(jax.value_and_grad(
        lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] ** 2), argnums=(0, 1)))
    result["moe_layer_s"] = min(timed(lambda: jax.block_until_ready(layer(state, x)),
                                       args.iters))

    a = jnp.asarray(rng.standard_normal((2048, 2048), np.float32))
    mm = jax.jit(jnp.dot)
    result["matmul_peak_gflops"] = 2 * 2048 ** 3 / min(
        timed(lambda: jax.block_until_ready(mm(a, a)), 10)) / 1e9
    print(json.dumps(result))
    return 0


def run_one(impl: str, args, config: Path, threads: int) -> dict:
    """One fresh subprocess of `impl` ("ours", "ours:KERNEL" or "transformers") on `config`;
    its parsed JSON line."""
    common = ["--config", str(config), "--batch", str(args.batch), "--seq", str(args.seq),
              "--iters", str(args.iters), "--moe-tokens", str(args.moe_tokens),
              "--threads", str(threads)]
    if impl.startswith("ours:"):
        common += ["--kernel", impl.split(":", 1)[1]]
    return side_by_side("ours" if impl.startswith("ours") else impl, __file__, HF_SCRIPT,
                        args.transformers_python, common, threads, omp_wait_policy="")


def _label(impl: str) -> str:
    return "transformers" if impl == "transformers" else (
        "dsv3-jax" + (f" ({impl.split(':', 1)[1]})" if ":" in impl else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/moe-64e.json")
    ap.add_argument("--experts", default="16,64,256", help="comma-separated n_routed_experts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=8, help="timed calls per process and part")
    ap.add_argument("--moe-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; medians reported")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--transformers-python", default="/work/fixenv/bin/python")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", default="", help="comma-separated grouped-matmul kernels of "
                    "ours, one row each (dsv3_jax/layers/platform_gmm.py; default the platform's)")
    ap.add_argument("--kernel", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return jax_worker(args)

    ours = [f"ours:{k}" for k in args.kernels.split(",") if k] or ["ours"]
    impls = ours + ["transformers"]
    if not Path(args.transformers_python).exists():
        print(f"NOTE: --transformers-python {args.transformers_python} not found; timing only "
              "ours (the venv: python3.11 + torch 2.13.0 CPU + transformers, see "
              "benchmarks/hf_train_step.py).")
        impls = ours
    base = json.loads((ROOT / args.config).read_text())
    load_before = os.getloadavg()[0]
    results, peaks = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for e in (int(v) for v in args.experts.split(",")):
            config = Path(tmp) / f"moe-{e}e.json"
            config.write_text(json.dumps(dict(base, n_routed_experts=e)))
            for r in range(args.repeats):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    res = run_one(impl, args, config, args.threads)
                    results.setdefault((e, impl), []).append(res)
                    peaks += [res["matmul_peak_gflops"]] if "matmul_peak_gflops" in res else []
                    print(f"  {e} experts round {r + 1}: {_label(impl):18s} forward "
                          f"{res['forward_s']:.3f} s  step {res['step_s']:.3f} s  MoE layer "
                          f"{res['moe_layer_s']:.3f} s", flush=True)

    tokens = args.batch * args.seq
    experts = sorted({e for e, _ in results})
    part = {(e, i): {k: median([x[k] for x in results[(e, i)]])
                     for k in ("forward_s", "step_s", "moe_layer_s")} for e, i in results}
    headers = ["experts", "impl", "params", "forward s", "step s", "step tokens/s", "step GFLOP/s",
               "MoE layer s", "MoE layer vs 16e", "forward speed vs PyTorch",
               "step speed vs PyTorch"]
    rows = []
    for e in experts:
        flops = results[(e, ours[0])][0]["flops_per_token"]
        for impl in impls:
            p = part[(e, impl)]
            ref16 = part.get((min(experts), impl), p)["moe_layer_s"]
            vs = lambda k: (f"{part[(e, 'transformers')][k] / p[k]:.2f}x"  # noqa: E731
                            if impl != "transformers" and "transformers" in impls else "")
            rows.append([e, _label(impl),
                         f"{results[(e, impl)][0]['params'] / 1e6:.1f}M", f"{p['forward_s']:.3f}",
                         f"{p['step_s']:.3f}", f"{tokens / p['step_s']:.0f}",
                         f"{tokens * flops / p['step_s'] / 1e9:.0f}", f"{p['moe_layer_s']:.3f}",
                         f"{p['moe_layer_s'] / ref16:.2f}", vs("forward_s"), vs("step_s")])
    out = table(headers, rows)
    peak = f"{max(peaks):.0f} GFLOP/s" if peaks else "not measured"
    load = f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print()
    print(f"fp32 matmul peak (jnp.dot 2048 x 2048, {args.threads} threads): {peak}; {load}")
    print(out)
    if not args.no_append:
        versions = ""
        if "transformers" in impls:
            versions = subprocess.run(
                [args.transformers_python, "-c", "import torch, transformers; "
                 "print(f'torch {torch.__version__}, transformers {transformers.__version__}')"],
                capture_output=True, text=True).stdout.strip()
        body = (f"Config `{args.config}` with `n_routed_experts` replaced; ids [{args.batch}, "
                f"{args.seq}], fp32, {args.threads} threads, {args.iters} timed calls per process "
                f"and part, {args.repeats} alternating rounds, medians; MoE layer: forward + "
                f"backward on {args.moe_tokens} tokens, best of {args.iters}. PyTorch side: "
                f"{versions or 'not run'}, eager attention, default grouped_mm experts, "
                f"torch.optim.AdamW, default OpenMP settings. Speed vs PyTorch = PyTorch's "
                f"time / ours (> 1: we are faster). fp32 matmul peak of this machine (jnp.dot "
                f"2048 x 2048): {peak}. {load}.\n\n{out}\n")
        append_section("Routed experts on CPU: dsv3-jax vs PyTorch at 16, 64, 256 experts", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
