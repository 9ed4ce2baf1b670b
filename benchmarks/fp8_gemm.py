"""FP8 vs bf16 GEMM throughput for the DeepSeek-V3 671B shapes (run on a GPU; CPU only emulates).

    python benchmarks/fp8_gemm.py                 # M = 4096, 16384 tokens; appends to BENCHMARKS.md
    python benchmarks/fp8_gemm.py --tokens 256 --no-append   # a quick smoke run (e.g. on CPU)

Candidates for the FP8 product (same numerics, SPEC section 7):
  scan     dsv3_jax.fp8.fp8_matmul: one float8 dot per 128-wide K block, scaled, fp32 accumulate
  batched  all K blocks as one batched float8 dot [kb, M, 128] x [N, kb, 128], then scale + sum
           (more memory: kb x M x N fp32)
  scaled   jax.lax.scaled_dot with the tile / per-column block scales (no VJP in JAX yet, so a
           winner here needs the scan or batched form for the backward)
  bf16     the baseline: bf16 operands, fp32 accumulation
Each is timed forward only, best of --repeats after a warm-up, and reported as TFLOP/s
(2 M K N / time); the fastest FP8 candidate over bf16 is the ratio that matters (goal on H100:
>= 1.5x). Quantization of activations and weights is inside the timed region for all FP8 rows.
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

from _common import append_section, table  # noqa: E402
from dsv3_jax.fp8 import BLOCK, fp8_matmul, quantize_tiles, quantize_weight  # noqa: E402

# (name, K, N): weights as x @ W with W [K, N]
SHAPES = [("expert gate/up 7168x2048", 7168, 2048), ("expert down 2048x7168", 2048, 7168),
          ("q_a 7168x1536", 7168, 1536), ("o_proj 16384x7168", 16384, 7168),
          ("dense 7168x18432", 7168, 18432)]


def batched_fp8(x, w):
    """All K blocks in one batched float8 dot, then per-block scales and the sum."""
    qx, sx = quantize_tiles(x)
    qw = quantize_weight(w)  # values [N, K], scales [N / 128, K / 128]
    m, k = qx.shape
    n = w.shape[1]
    kb = k // BLOCK
    p = jnp.einsum("bmk,nbk->bmn", qx.reshape(m, kb, BLOCK).transpose(1, 0, 2),
                   qw.q.reshape(n, kb, BLOCK), preferred_element_type=jnp.float32)
    sw = jnp.repeat(qw.scale, BLOCK, axis=0)[:n]
    return jnp.einsum("bmn,mb,nb->mn", p, sx, sw).astype(x.dtype)


def scaled_dot_fp8(x, w):
    """XLA's scaled dot on the same e4m3 operands and scales (both K-major: contraction minor)."""
    qx, sx = quantize_tiles(x)
    qw = quantize_weight(w)  # values [N, K], scales [N / 128, K / 128]
    sw = jnp.repeat(qw.scale, BLOCK, axis=0)[:w.shape[1]]
    qwp = jnp.pad(qw.q, ((0, 0), (0, qx.shape[1] - w.shape[0])))
    return jax.lax.scaled_dot(qx, qwp, lhs_scale=sx, rhs_scale=sw,
                              dimension_numbers=(((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32).astype(x.dtype)


CANDIDATES = {
    "fp8 scan": fp8_matmul,
    "fp8 batched": batched_fp8,
    **({"fp8 scaled": scaled_dot_fp8} if hasattr(jax.lax, "scaled_dot") else {}),
    "bf16": lambda x, w: jnp.einsum("mk,kn->mn", x, w.astype(jnp.bfloat16),
                                    preferred_element_type=jnp.float32).astype(x.dtype),
}


def best_time(fn, *args, repeats: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-append", dest="append", action="store_false")
    args = p.parse_args()
    rows = []
    for m in (int(t) for t in args.tokens.split(",")):
        for name, k, n in SHAPES:
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
            w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02
            flops = 2 * m * k * n
            tflops = {c: flops / best_time(f, x, w, repeats=args.repeats) / 1e12
                      for c, f in CANDIDATES.items()}
            best8 = max(v for c, v in tflops.items() if c.startswith("fp8"))
            rows.append([m, name, *(f"{tflops[c]:.1f}" for c in CANDIDATES),
                         f"{best8 / tflops['bf16']:.2f}x"])
            print(rows[-1], flush=True)
    body = (f"Device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}). Forward "
            "only, quantization included, TFLOP/s = 2MKN / best time.\n\n"
            + table(["tokens", "GEMM", *CANDIDATES, "best fp8 / bf16"], rows))
    print(body)
    if args.append:
        append_section("FP8 vs bf16 GEMMs, 671B shapes", body)


if __name__ == "__main__":
    main()
