#!/usr/bin/env python3
"""JIT compile time of the forward pass and of a training-style step, versus depth.

    python benchmarks/compile_time.py                      # configs/tiny.json, 4 and 32 layers
    python benchmarks/compile_time.py --layers 4,16,32 --batch 2 --seq 128 --repeats 3

For configs/tiny.json with `num_hidden_layers` set to each of --layers, times the three stages of
`jax.jit` separately: trace (`jit(f).trace(...)`), lower (`.lower()`, to StableHLO) and compile
(`.compile()`, XLA), for

  forward  `model(ids)` -> logits
  train    `jax.value_and_grad` of the mean next-token cross-entropy w.r.t. the nnx.Param state

Nothing is allocated: the model is built with `nnx.eval_shape`, split with `nnx.split`, and
`ids` is a `jax.ShapeDtypeStruct`. Each measurement uses a fresh function object, so no trace or
executable cache is reused; the layer counts are interleaved over --repeats rounds and the table
shows medians. Layers of one kind are scanned (DESIGN principle 6), so compile time should be
flat in depth: the last column is the ratio to the shallowest depth (about 1 is the goal).
Prints a table and appends a dated section to BENCHMARKS.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import dsv3_jax  # noqa: E402
from _common import ROOT, append_section, median, table  # noqa: E402

KINDS = ("forward", "train")


def abstract_model(cfg: dsv3_jax.ModelConfig):
    """(graphdef, params, rest) of a Transformer whose leaves are ShapeDtypeStructs."""
    model = nnx.eval_shape(lambda: dsv3_jax.Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)


def make_fn(kind: str, graphdef):
    """A fresh (params, rest, ids) -> ... function (fresh so jit caches never hit)."""

    def forward(params, rest, ids):
        return nnx.merge(graphdef, params, rest)(ids)

    def loss(params, rest, ids):
        # copy=True: fresh Variables at the grad trace level; reusing the jit-level non-Param
        # ones (e.g. the routing bias) trips nnx.scan's "different trace level" check.
        logits = nnx.merge(graphdef, params, rest, copy=True)(ids)[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return nll.mean()

    return forward if kind == "forward" else jax.value_and_grad(loss)


def time_compile(kind: str, cfg, batch: int, seq: int) -> dict[str, float]:
    """Seconds spent in trace, lower and compile of one fresh jit of `kind`."""
    graphdef, params, rest = abstract_model(cfg)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    jitted = jax.jit(make_fn(kind, graphdef))
    t0 = time.perf_counter()
    traced = jitted.trace(params, rest, ids)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "total": t3 - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"))
    ap.add_argument("--layers", default="4,32", help="comma-separated num_hidden_layers values")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args()

    layers = [int(n) for n in args.layers.split(",")]
    base = dsv3_jax.ModelConfig.from_json(args.config)
    cfgs = {n: base.replace(num_hidden_layers=n) for n in layers}

    # One-time backend / LLVM start-up costs land in a throw-away compile, not the first row.
    for kind in KINDS:
        time_compile(kind, base.replace(num_hidden_layers=2), 1, 8)

    results = {(k, n): [] for k in KINDS for n in layers}
    for r in range(args.repeats):
        order = layers if r % 2 == 0 else layers[::-1]  # alternate order to cancel drift
        for kind in KINDS:
            for n in order:
                t = time_compile(kind, cfgs[n], args.batch, args.seq)
                results[(kind, n)].append(t)
                print(f"  round {r + 1}: {kind:7s} {n:3d} layers  "
                      + "  ".join(f"{s} {v:6.2f}s" for s, v in t.items()), flush=True)

    headers = ["step", "layers", "trace s", "lower s", "compile s", "total s",
               f"total / {layers[0]}L"]
    rows = []
    for kind in KINDS:
        ref = median([t["total"] for t in results[(kind, layers[0])]])
        for n in layers:
            med = {s: median([t[s] for t in results[(kind, n)]]) for s in ("trace", "lower", "compile", "total")}
            rows.append([kind, n, f"{med['trace']:.2f}", f"{med['lower']:.2f}",
                         f"{med['compile']:.2f}", f"{med['total']:.2f}", f"{med['total'] / ref:.2f}"])
    out = table(headers, rows)
    print()
    print(out)

    if not args.no_append:
        cfg_name = Path(args.config).name
        body = (f"Config `{cfg_name}` with num_hidden_layers = {', '.join(map(str, layers))}; "
                f"ids [{args.batch}, {args.seq}] int32, fp32 params, abstract (nothing allocated). "
                f"`forward` = `model(ids)`; `train` = `jax.value_and_grad` of mean next-token "
                f"cross-entropy w.r.t. nnx.Param. Median of {args.repeats} interleaved rounds, "
                f"seconds of wall time, each from a fresh `jax.jit` (no cache hits).\n\n{out}\n")
        append_section("Compile time vs depth (jit trace / lower / compile)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
