#!/usr/bin/env python3
"""Compiled memory of the training loss's head: chunked vs whole-logits cross entropy.

    python benchmarks/chunked_loss.py                     # V3 head (7168 x 129,280), 4K and 16K tokens
    python benchmarks/chunked_loss.py --tokens 4096 --no-append

The function is the loss's head part as `lm_loss` runs it: the final RMSNorm, then for the main
head (and, with MTP, a second head on another hidden state) the vocabulary projection in bf16
with fp32 accumulation and the fp32 log-softmax cross entropy, and its gradients w.r.t. the
hidden states, the norm gain and lm_head (fp32 master weights). "whole" is one chunk (the
unchunked formula: [tokens, vocab] fp32 logits and their gradient), "chunked" the default
vocabulary chunk of dsv3_jax/train/losses.py (`vocab_chunk`, LOGITS_CHUNK_BYTES per chunk). Nothing runs
and nothing is allocated: `jax.jit(...).lower(...).compile().memory_analysis()` on XLA:CPU
gives the temporaries (the arguments, 3.7 GB of fp32 lm_head among them, are the same for
both). A second table times the same function (jitted, run on the CPU, median of --repeats)
at a size the CPU runs in seconds (--time-shape tokens,embed,vocab), whole vs chunked in 8
chunks: the chunked backward pass recomputes the logits (4 head matmuls instead of 3). Prints
the tables and appends a dated section to BENCHMARKS.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _common import append_section, table  # noqa: E402
from dsv3_jax.train.losses import LOGITS_CHUNK_BYTES, heads_nll, loss_peak_bytes, vocab_chunk  # noqa: E402

GB = 1e9


def loss_fn(heads: int, chunk: int):
    """(hidden states, gain, lm_head, targets) -> summed CE of `heads` heads, as lm_loss runs it."""
    def f(xs, gain, lm_head, targets):
        hs = []
        for x in xs:
            xf = x.astype(jnp.float32)
            hs.append((xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(x.dtype)
                      * gain)
        return sum(heads_nll(hs, lm_head, [targets] * heads, [None] * heads, dtype=jnp.bfloat16,
                             chunk=chunk))
    return jax.grad(f, argnums=(0, 1, 2))


def temp_bytes(heads, rows, seq, embed, vocab, chunk) -> tuple[int, float]:
    args = ([jax.ShapeDtypeStruct((rows, seq, embed), jnp.bfloat16)] * heads,
            jax.ShapeDtypeStruct((embed,), jnp.float32),
            jax.ShapeDtypeStruct((embed, vocab), jnp.float32),
            jax.ShapeDtypeStruct((rows, seq), jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(loss_fn(heads, chunk)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t0


def run_seconds(tokens, embed, vocab, chunk, repeats) -> float:
    """Median wall time of one loss + gradients call (main head, fp32 parameters, bf16 compute)."""
    rng = jax.random.split(jax.random.key(0), 3)
    args = ([jax.random.normal(rng[0], (1, tokens, embed), jnp.bfloat16)], jnp.ones((embed,)),
            0.02 * jax.random.normal(rng[1], (embed, vocab)),
            jax.random.randint(rng[2], (1, tokens), 0, vocab))
    f = jax.jit(loss_fn(1, chunk))
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embed", type=int, default=7168)
    p.add_argument("--vocab", type=int, default=129280)
    p.add_argument("--tokens", default="4096,16384", help="sequence lengths (one row each)")
    p.add_argument("--time-shape", default="1024,512,32768", help="tokens,embed,vocab of the timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for seq in map(int, args.tokens.split(",")):
        for heads in (1, 2):
            chunk = vocab_chunk(seq, args.vocab)
            whole, t_whole = temp_bytes(heads, 1, seq, args.embed, args.vocab, args.vocab)
            part, t_part = temp_bytes(heads, 1, seq, args.embed, args.vocab, chunk)
            logits = seq * args.vocab * 4
            rows.append([seq, "main + MTP" if heads == 2 else "main", f"{logits / GB:.2f}",
                         f"{whole / GB:.2f}", f"{-(-args.vocab // chunk)} x {chunk}", f"{part / GB:.3f}",
                         f"{whole / part:.1f}x",
                         f"{loss_peak_bytes(seq, args.embed, args.vocab, heads) / GB:.3f}",
                         f"{t_whole:.1f} / {t_part:.1f}"])
            print(rows[-1], flush=True)
    headers = ["tokens", "heads", "fp32 logits GB (one head)", "whole: temp GB",
               "chunks x vocab entries", "chunked: temp GB", "less", "planner GB (plan.py)",
               "compile s (whole / chunked)"]
    out = table(headers, rows)
    print(out)
    tokens, embed, vocab = map(int, args.time_shape.split(","))
    whole = run_seconds(tokens, embed, vocab, vocab, args.repeats)
    part = run_seconds(tokens, embed, vocab, -(-vocab // 8), args.repeats)
    timing = table(["tokens", "embed", "vocab", "whole s", "chunked (8 chunks) s", "chunked / whole"],
                   [[tokens, embed, vocab, f"{whole:.3f}", f"{part:.3f}", f"{part / whole:.2f}"]])
    print(timing)
    if not args.no_append:
        body = (f"Loss head (final norm, {args.embed} x {args.vocab:,} vocabulary projection in bf16 "
                "with fp32 accumulation, fp32 log-softmax CE) and its gradients w.r.t. hidden, "
                "norm gain and lm_head, compiled by XLA:CPU (memory_analysis, nothing allocated); "
                f"one row per device. Chunk budget LOGITS_CHUNK_BYTES = {LOGITS_CHUNK_BYTES / 2**20:.0f} "
                "MiB of fp32 logits per chunk (dsv3_jax/train/losses.py). Temporaries exclude "
                "the arguments (fp32 lm_head) and the outputs (its fp32 gradient).\n\n" + out +
                "\n\nRun time of loss + gradients on this CPU (median of "
                f"{args.repeats}; the chunked backward recomputes the logits):\n\n" + timing)
        append_section("Chunked cross entropy: compiled temporary memory of the loss head", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
