"""Every GPU measurement the project owes, in one run of under 10 minutes on one H100 / H200.

    python benchmarks/gpu_suite.py                   # all four sections; appends to BENCHMARKS.md
    python benchmarks/gpu_suite.py --only gemm,grouped --no-write
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite.md   # tiny shapes, CPU, ~30 s

Sections (rows of one table; speed-up is against the case's baseline row):
  gemm     bf16 vs FP8 GEMMs at the DeepSeek-V3 671B shapes, 4096 and 16384 tokens:
           `jnp.dot` with bf16 operands and fp32 accumulation (baseline) vs
           `dsv3_jax.fp8.fp8_matmul` on a stored `QuantizedWeight` (inference) and on a bf16
           weight it quantizes every call (training); activation quantization is timed in both.
  grouped  routed-expert grouped matmul 7168 -> 2048, forward and forward + backward (dx, dW),
           on the tiled expert-grouped buffer the experts use: ours (dsv3_jax/layers/
           grouped_matmul.py, baseline) vs the kernel dsv3_jax/layers/platform_gmm.py chooses
           for this backend (tokamax's Mosaic GPU kernels on a GPU where tokamax is installed)
           vs the other kernels it offers (`jax.lax.ragged_dot`, tokamax). Two cases: one
           device's slice of V3 with expert=8 (32 experts, 8192 rows) and a whole layer (256
           experts, 8192 tokens x top-8). TFLOP/s count useful FLOPs (2 x rows x K x N per
           product); a kernel whose compiled temporaries do not fit in free memory (XLA:GPU's
           dense expansion of ragged_dot) is not run.
  train    one optimizer step (train_step, as train.py runs it) of configs/moe-1b.json, bf16
           compute and fp32 master weights: tokens/s and MFU (dsv3_jax/train/flops.py).
  decode   the serving engine's jitted decode step (dsv3_jax/serve/steps.py) over the latent
           cache at batch 1 / 32 / 256, every slot at --context, bf16 random weights, greedy.
Each timing: a compile + warm-up call, then the median of up to --repeats calls
(`block_until_ready`), fewer when a call is slow, so the run stays inside --budget seconds.
A section that raises is reported as an error row and the others still run; the exit code
is 1 if any row is an error. Progress and per-section times go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import ROOT, append_section, device_line, median, table  # noqa: E402

SECTIONS = ("gemm", "grouped", "train", "decode")
SHARE = {"gemm": 0.3, "grouped": 0.15, "train": 0.3, "decode": 0.25}  # of --budget
HEADERS = ["section", "case", "implementation", "ms", "rate", "speed-up", "note"]
BF16 = jnp.bfloat16

# (name, K, N) of x @ W, W [K, N]: the 671B projections
GEMMS = [("q_a_proj", 7168, 1536), ("q_b_proj", 1536, 24576), ("kv_a_proj", 7168, 576),
         ("o_proj", 16384, 7168), ("expert gate/up", 7168, 2048), ("expert down", 2048, 7168),
         ("dense gate/up", 7168, 18432), ("dense down", 18432, 7168)]
FULL = dict(tokens=(4096, 16384), gemms=GEMMS, config="configs/moe-1b.json", train=(16, 2048),
            grouped=[(32, 8192, 7168, 2048), (256, 65536, 7168, 2048)],
            decode_batches=(1, 32, 256), context=2048)
SMOKE = dict(tokens=(64,), gemms=[("q_a_proj", 256, 128), ("o_proj", 512, 256)],
             config="configs/tiny.json", train=(2, 32), grouped=[(8, 256, 128, 64)],
             decode_batches=(1, 4), context=64)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Suite:
    """The table's rows, the time budget and the timing helpers shared by the sections."""

    def __init__(self, args, shapes: dict):
        self.args, self.shapes = args, shapes
        self.rows: list[list[str]] = []
        self.failed = False
        self.deadline = time.perf_counter() + args.budget
        self.section_end = self.deadline

    def add(self, section, case, impl, seconds=None, rate="", speedup="", note=""):
        ms = "-" if seconds is None else f"{seconds * 1e3:.3f}"
        self.rows.append([section, case, impl, ms, rate, speedup, note])
        log("  " + " | ".join(str(c) for c in self.rows[-1]))

    @contextlib.contextmanager
    def guard(self, section: str, case: str, impl: str = "", optional: bool = False):
        """Run one measurement; an exception becomes an error row (optional ones: a note)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported in the table, the suite goes on
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            self.failed |= not optional
            self.add(section, case, impl,
                     note=("failed (optional): " if optional else "ERROR ") + msg)
            if not optional:
                import traceback
                traceback.print_exc(file=sys.stderr)

    def time(self, fn, *args, reps: int | None = None) -> float:
        """Median seconds of `fn(*args)` after one warm-up call; at least one timed call, then
        more while under --repeats and this measurement's share of the section's time."""
        jax.block_until_ready(fn(*args))
        left = max(self.section_end - time.perf_counter(), 0.0)
        stop = time.perf_counter() + min(left / 4, 10.0)
        times: list[float] = []
        reps = reps or self.args.repeats
        while len(times) < reps and (not times or time.perf_counter() < stop):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        return median(times)

    def out_of_time(self, section: str, case: str) -> bool:
        if time.perf_counter() < self.section_end:
            return False
        self.add(section, case, "-", note="not run: over this section's time budget")
        return True


def compiled(fn, *args):
    """`jax.jit(fn)` compiled for `args`, and its temporary bytes (None when unknown)."""
    c = jax.jit(fn).lower(*args).compile()
    mem = c.memory_analysis()
    return c, getattr(mem, "temp_size_in_bytes", None)


def free_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None


def tflops(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e12:.2f} TFLOP/s"


def gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


# -- 1. GEMMs ------------------------------------------------------------------------------------

def section_gemm(s: Suite) -> None:
    from dsv3_jax.fp8 import fp8_matmul, quantize_weight
    from dsv3_jax.layers.linear import fp8_supported

    fp8 = fp8_supported()  # CPU (emulated) or a GPU of compute capability >= 8.9
    cc = getattr(jax.devices()[0], "compute_capability", "?")
    bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    fp8_fn = jax.jit(fp8_matmul)
    for m in s.shapes["tokens"]:
        for name, k, n in s.shapes["gemms"]:
            case = f"{name} {k}x{n}, {m} tokens"
            if s.out_of_time("gemm", case):
                return
            flops = 2 * m * k * n
            x = jax.random.normal(jax.random.key(0), (m, k), BF16)
            w = jax.random.normal(jax.random.key(1), (k, n), BF16) * 0.02
            base = None
            with s.guard("gemm", case, "bf16 jnp.dot"):
                base = s.time(bf16, x, w)
                s.add("gemm", case, "bf16 jnp.dot", base, tflops(flops, base), "1.00x", "baseline")
            if not fp8:
                s.add("gemm", case, "fp8_matmul", note=f"not run: compute capability {cc} < 8.9")
                continue
            qw = jax.jit(quantize_weight)(w)
            for impl, weight in (("fp8_matmul, stored QuantizedWeight", qw),
                                 ("fp8_matmul, quantizing w", w)):
                with s.guard("gemm", case, impl):
                    t = s.time(fp8_fn, x, weight)
                    s.add("gemm", case, impl, t, tflops(flops, t),
                          f"{base / t:.2f}x" if base else "-")
            del x, w, qw


# -- 2. grouped expert matmul ---------------------------------------------------------------------

def _grouped_inputs(experts: int, rows: int, k: int, n: int):
    from dsv3_jax.layers import grouped_matmul as gm

    ids = jnp.asarray(np.random.default_rng(0).integers(0, experts, rows), jnp.int32)
    layout = jax.jit(gm.make_layout, static_argnums=1)(ids, experts)
    keys = jax.random.split(jax.random.key(2), 3)
    xs = jax.random.normal(keys[0], (rows, k), BF16)
    w = jax.random.normal(keys[1], (experts, k, n), BF16) * 0.02
    dy = jax.random.normal(keys[2], (rows, n), BF16)
    return layout, gm.scatter_rows(xs, layout), w, gm.scatter_rows(dy, layout)


def section_grouped(s: Suite) -> None:
    """Ours (baseline) against the kernel platform_gmm chooses for this backend and the other
    kernels it offers, all on the same tiled expert-grouped buffer."""
    from dsv3_jax.layers import platform_gmm
    from sharding.mesh import platform as mesh_platform

    platform = mesh_platform(None)
    choice = platform_gmm.choose(platform, fp8=False, dtype=BF16,
                                 device_kind=jax.devices()[0].device_kind)
    others = [i for i in platform_gmm.IMPLEMENTATIONS if i not in ("ours", choice)
              and (i != "tokamax" or platform_gmm.have_tokamax())]
    if not platform_gmm.have_tokamax():
        log("  tokamax not installed (pip install -e \".[tokamax]\"); its rows are skipped")
    # (row label, implementation); the choice is timed even where it is ours (CPU)
    impls = [("ours grouped_matmul", "ours"), (f"platform_gmm choice on {platform}: {choice}",
                                               choice)] + [(i, i) for i in others]

    def fn(impl, mode):
        def f(x, w, layout):
            return platform_gmm.grouped_matmul(x, w, layout, BF16, impl=impl)
        if mode == "fwd":
            return f
        return lambda x, w, layout, dy: jax.vjp(lambda x, w: f(x, w, layout), x, w)[1](dy)

    for experts, rows, k, n in s.shapes["grouped"]:
        layout, x, w, dy = _grouped_inputs(experts, rows, k, n)
        for mode, mult in (("fwd", 1), ("fwd+bwd", 3)):
            case = f"{mode} {experts} experts, {rows} rows, {k}->{n}"
            if s.out_of_time("grouped", case):
                return
            flops = mult * 2 * rows * k * n
            base = None
            for label, impl in impls:
                with s.guard("grouped", case, label, optional=impl not in ("ours", choice)):
                    args = (x, w, layout) if mode == "fwd" else (x, w, layout, dy)
                    c, temp = compiled(fn(impl, mode), *args)
                    free = free_bytes()
                    if temp is not None and free is not None and temp > 0.8 * free:
                        s.add("grouped", case, label, note=f"not run: temporaries {gb(temp)} > "
                              f"free {gb(free)}")
                        continue
                    t = s.time(c, *args)
                    base = base or (t if impl == "ours" else None)
                    s.add("grouped", case, label, t, tflops(flops, t),
                          f"{base / t:.2f}x" if base else "-",
                          f"temp {gb(temp)}, tile {layout.tile}")
        del layout, x, w, dy
        gc.collect()


# -- 3. training step -----------------------------------------------------------------------------

def section_train(s: Suite) -> None:
    from flax import nnx

    from dsv3_jax import ModelConfig, init_model
    from dsv3_jax.train.flops import activated_matmul_params, flops_per_token, mfu
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.step import train_step

    cfg = ModelConfig.from_json(ROOT / s.args.config)
    batch, seq = s.args.train_shape
    case = (f"{Path(s.args.config).stem}: {cfg.num_params() / 1e9:.2f}B params "
            f"({activated_matmul_params(cfg) / 1e9:.2f}B activated), {batch} x {seq} tokens")
    impl = "train_step, bf16, remat"
    with s.guard("train", case, impl):
        t0 = time.perf_counter()
        # fp32 master weights, bf16 compute; remat: MLA's [batch, heads, seq, seq] scores of
        # every layer would otherwise stay live for the backward (73 GB at 8 x 2048)
        model = init_model(cfg, precision="bf16", remat=True)
        optimizer = nnx.Optimizer(model, make_optimizer(model, lr=1e-4, warmup_steps=10,
                                                        total_steps=1000), wrt=nnx.Param)
        log(f"  init {time.perf_counter() - t0:.1f}s")
        tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, batch, seq + 1))
        tokens = jnp.asarray(tokens, jnp.int32)
        step = nnx.jit(train_step)  # as train.py runs it (dsv3_jax/train/loop.py)
        t0 = time.perf_counter()
        metrics = jax.block_until_ready(step(model, optimizer, tokens))
        log(f"  compile + first step {time.perf_counter() - t0:.1f}s, "
            f"loss {float(metrics['loss']):.3f}")
        t = s.time(step, model, optimizer, tokens, reps=max(3, s.args.repeats // 2))
        loss = float(step(model, optimizer, tokens)["loss"])
        tps = batch * seq / t
        util = mfu(tps, cfg, seq, num_devices=1)
        s.add("train", case, impl, t, f"{tps:,.0f} tok/s", "",
              (f"MFU {util:.1%}" if util is not None else "MFU n/a (peak unknown)")
              + f", {flops_per_token(cfg, seq) / 1e9:.2f} GFLOP/token, loss {loss:.3f}")


# -- 4. decode ------------------------------------------------------------------------------------

def section_decode(s: Suite) -> None:
    from flax import nnx

    from dsv3_jax import ModelConfig, init_model
    from dsv3_jax.serve import cache as kv
    from dsv3_jax.serve import steps
    from dsv3_jax.serve.sampling import SamplingArrays

    cfg = ModelConfig.from_json(ROOT / s.args.config)
    ctx = s.args.context
    if ctx > cfg.max_position_embeddings:
        raise ValueError(f"context {ctx} > max_position_embeddings {cfg.max_position_embeddings}")
    t0 = time.perf_counter()
    model = init_model(cfg, precision="bf16", param_dtype=BF16)
    log(f"  init {time.perf_counter() - t0:.1f}s")
    graphdef, state = nnx.split(model)
    weights, treedef = jax.tree.flatten(state)
    _, decode, _ = steps.jitted(graphdef, treedef)
    for b in s.shapes["decode_batches"]:
        case = f"batch {b}, context {ctx}"
        if s.out_of_time("decode", case):
            return
        with s.guard("decode", case, "decode step (latent cache)"):
            cache = kv.allocate(model, b, ctx, mtp=False)
            put = functools.partial(kv.put, axes=("batch",))
            sp = SamplingArrays(put(np.zeros(b, np.float32)), put(np.zeros(b, np.int32)),
                                put(np.ones(b, np.float32)), put(np.zeros(b, np.uint32)))
            pos, active = put(np.full(b, ctx - 1, np.int32)), put(np.ones(b, bool))
            state_ = {"cache": cache, "last": put(np.zeros(b, np.int32))}
            n_steps = 10

            def run():  # chained on the device like the engine; every slot at position ctx - 1
                for _ in range(n_steps):
                    tok, _, state_["cache"], _ = decode(weights, state_["cache"], state_["last"],
                                                        pos, active, sp, window=ctx)
                    state_["last"] = tok
                return tok

            t = s.time(run, reps=3) / n_steps
            cache_gb = b * ctx * kv.bytes_per_token_per_layer(cfg, BF16) * cfg.num_hidden_layers
            s.add("decode", case, "decode step (latent cache)", t, f"{b / t:,.0f} tok/s", "",
                  f"ms per step; cache {cache_gb / 1e9:.2f} GB")
            del cache, state_
            gc.collect()


# -- driver ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of every path)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=None, help="markdown file to append to "
                   "(default BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--budget", type=float, default=None, help="seconds for all sections "
                   "(default 540; --smoke 120)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement "
                   "(default 20; --smoke 2)")
    p.add_argument("--config", default=None, help="model of the train and decode sections "
                   "(default configs/moe-1b.json; --smoke configs/tiny.json)")
    p.add_argument("--train-shape", default=None, help="BATCHxSEQ of the training step "
                   "(default 16x2048)")
    p.add_argument("--context", type=int, default=None, help="decode context (default 2048)")
    args = p.parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    args.train_shape = (tuple(int(v) for v in args.train_shape.lower().split("x"))
                        if args.train_shape else shapes["train"])
    args.context = args.context or shapes["context"]
    args.budget = args.budget or (120.0 if args.smoke else 540.0)
    args.repeats = args.repeats or (2 if args.smoke else 20)
    args.config = args.config or shapes["config"]
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if bad := [x for x in only if x not in SECTIONS]:
        p.error(f"--only {','.join(bad)}: sections are {', '.join(SECTIONS)}")

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s)), jax "
        f"{jax.__version__}, budget {args.budget:.0f}s{' (smoke)' if args.smoke else ''}")
    suite = Suite(args, shapes)
    fns = {"gemm": section_gemm, "grouped": section_grouped, "train": section_train,
           "decode": section_decode}
    start = time.perf_counter()
    shares = sum(SHARE[n] for n in only)
    elapsed = {}
    for name in only:
        t0 = time.perf_counter()
        left = suite.deadline - t0
        suite.section_end = t0 + left * SHARE[name] / shares
        shares -= SHARE[name]
        log(f"[{name}] started ({left:.0f}s of the budget left)")
        if left <= 0:
            suite.add(name, "section", "-", note="not run: the --budget is spent")
        else:
            with suite.guard(name, "section", "-"):
                fns[name](suite)
        jax.clear_caches()
        gc.collect()
        elapsed[name] = time.perf_counter() - t0
        log(f"[{name}] done in {elapsed[name]:.1f}s")

    errors = sum(r[-1].startswith("ERROR") for r in suite.rows)
    body = (("Smoke shapes: a test of the code paths, not a measurement. " if args.smoke else "")
            + "ms: median per call (decode: per step); rate: useful FLOPs or tokens per second; "
            "speed-up: the case's baseline time / this time. Seconds per section: "
            + ", ".join(f"{n} {t:.0f}" for n, t in elapsed.items())
            + f" (total {time.perf_counter() - start:.0f})"
            + (f". **{errors} error row(s).**" if errors else ".") + "\n\n"
            + table(HEADERS, suite.rows))
    print(f"{device_line()}\n\n{body}")
    if not args.no_write:
        append_section(f"GPU suite on {dev.device_kind}, jax {jax.__version__}", body,
                       path=args.out or ROOT / "BENCHMARKS.md")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
