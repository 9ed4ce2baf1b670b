"""MoE layer forward+backward time as routed experts grow (fixed top-k and expert width).

    .venv/bin/python benchmarks/moe_scaling.py [--tokens 4096] [--experts 16,64,256]

Routed-expert cost must follow the routed rows, not experts x tokens: the goal is 256 experts
within 1.5x the time of 16. Also prints the expert-parallel all-to-all bytes per step,
computed from the config: the fixed-size buffers this repo sends on CPU (dropless bound) and
the ragged ideal (only the routed rows) that `ragged_all_to_all` would send on GPU/TPU.
Appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from _common import append_section, table  # noqa: E402
from dsv3_jax import ModelConfig  # noqa: E402
from dsv3_jax.layers.grouped_matmul import choose_tile  # noqa: E402
from dsv3_jax.layers.moe import MoE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def time_layer(cfg: ModelConfig, tokens: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of value_and_grad of one MoE layer, and compiled GFLOPs."""
    moe = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(moe)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape, np.float32) * 0.05), state)
    x = jnp.asarray(rng.standard_normal((1, tokens, cfg.hidden_size), np.float32))
    step = jax.jit(jax.value_and_grad(
        lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] ** 2), argnums=(0, 1)))
    flops = step.lower(state, x).compile().cost_analysis().get("flops", float("nan"))
    jax.block_until_ready(step(state, x))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(step(state, x))
        best = min(best, time.perf_counter() - t)
    return best, flops / 1e9


def all_to_all_bytes(cfg: ModelConfig, tokens_per_device: int, ep: int, bytes_per: int) -> tuple[int, int]:
    """Per device, per MoE layer, forward + backward: (fixed dropless buffers, ragged ideal)."""
    k, e_local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
    cap = tokens_per_device * min(k, e_local)
    # dispatch + return in the forward, the same two transposed in the backward
    fixed = 4 * ep * cap * cfg.hidden_size * bytes_per
    ragged = 4 * tokens_per_device * k * cfg.hidden_size * bytes_per * (ep - 1) // ep
    return fixed, ragged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", default="16,64,256")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--width", type=int, default=256, help="moe_intermediate_size")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-append", dest="append", action="store_false", help="do not write BENCHMARKS.md")
    args = p.parse_args()
    base = ModelConfig.from_json(ROOT / "configs" / "tiny.json").replace(
        hidden_size=args.hidden, moe_intermediate_size=args.width, num_experts_per_tok=args.top_k,
        n_group=1, topk_group=1, n_shared_experts=0)

    rows = []
    for e in (int(v) for v in args.experts.split(",")):
        cfg = base.replace(n_routed_experts=e)
        secs, gflops = time_layer(cfg, args.tokens, args.repeats)
        rows.append((e, choose_tile(args.tokens * args.top_k, e), secs, gflops))
        print(f"experts {e:4d}: {secs * 1e3:8.1f} ms  ({gflops:.1f} GFLOP compiled)", flush=True)
    t0 = rows[0][2]
    scaling = table(["routed experts", "tile rows", "fwd+bwd ms", "vs first",
                     "XLA cost GFLOP (loop bodies once)"],
                    [[e, tile, f"{s * 1e3:.1f}", f"{s / t0:.2f}x", f"{g:.1f}"] for e, tile, s, g in rows])

    v3 = ModelConfig.from_json(ROOT / "configs" / "deepseek-v3-671b.json")
    a2a_rows = []
    for name, cfg, t, ep in [("this benchmark, 256 experts", base.replace(n_routed_experts=256), args.tokens, 8),
                             ("DeepSeek-V3 671B, bf16", v3, 4096, 8), ("DeepSeek-V3 671B, bf16", v3, 4096, 64)]:
        fixed, ragged = all_to_all_bytes(cfg, t, ep, 2 if "bf16" in name else 4)
        a2a_rows.append([name, t, ep, f"{fixed / 1e6:.0f}", f"{ragged / 1e6:.0f}"])
    a2a = table(["config", "tokens/device", "expert axis", "fixed buffers (MB)", "ragged ideal (MB)"],
                a2a_rows)
    body = "\n".join([
        f"One MoE layer (no shared expert), {args.tokens} tokens, top-{args.top_k}, hidden "
        f"{args.hidden}, expert width {args.width}, fp32, value_and_grad, best of {args.repeats}.\n",
        scaling, f"\n{rows[-1][0]} experts vs {rows[0][0]}: **{rows[-1][2] / t0:.2f}x** (goal for 256 vs 16: "
        "within 1.5x).\n",
        "All-to-all bytes per device per MoE layer and step (forward + backward, dispatch + "
        "return), from the config:\n", a2a])
    print(body)
    if args.append:
        append_section("MoE layer scaling with routed experts", body)


if __name__ == "__main__":
    main()
