#!/usr/bin/env python3
"""Long context: blockwise (flash-style) MLA attention vs the dense score matrix, on CPU and as
the real TPU / GPU compilers size it.

    python benchmarks/long_context.py                  # both parts, ~30 minutes on 2 cores
    python benchmarks/long_context.py --part demo      # 1. and 2. only
    python benchmarks/long_context.py --part layer     # 3. only (compiles, nothing runs)
    python benchmarks/long_context.py --smoke          # every path at small shapes, < 60 s

Three tables, appended to BENCHMARKS.md as one section (`--out FILE` elsewhere, `--no-write`
to only print; `--smoke` writes only with `--out`):
1. Training on CPU with configs/tiny-32k.json (YaRN to 32K positions), batch 1, sequence
   lengths --seqs: the library's train step (`dsv3_jax.train.step.train_step`: loss with MTP,
   gradients, AdamW, routing-bias update; fp32, no remat, as `train.py` runs by default) with
   the blockwise attention (the default) and, side by side, with the dense attention
   (`attention.implementation("dense")`: the whole [batch, heads, S, S] fp32 score matrix).
   Each configuration runs in its own process: compile time, the compiled program's
   `memory_analysis()` (arguments + temporaries), the median step time after compile, and the
   process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, model, optimizer and compiler
   included). A dense configuration whose compiled memory exceeds --dense-budget-gb is
   compiled but not run ("skipped").
2. The serving engine (`Engine(max_batch=1, speculative=False)`) on one --prompt-token prompt:
   the whole prompt in one prefill, then with `prefill_chunk=--chunk`; --new greedy tokens.
   Wall time of the first request (compiles included), of a second identical request (warm),
   its time to first token, and the process's peak RSS. Both must give the same tokens.
3. One DeepSeek-V3-shaped layer's train step (a dense `Block` of configs/deepseek-v3-671b.json:
   hidden 7168, 128 heads, q_lora 1536, kv_lora 512, qk 128 + 64, v 128, FFN 18432; bf16
   parameters and compute, batch 1; forward + backward w.r.t. the parameters and the input),
   compiled for one device of each --targets (XLA:CPU; a TPU v5p chip with libtpu; one H100
   with XLA:GPU deviceless), at --layer-seqs tokens: the compiler's temporary bytes with the
   target's default attention (blockwise on CPU, Pallas splash on TPU, cuDNN flash on GPU),
   with the blockwise form forced, and with the dense form. Each target compiles in its own
   process with the environment `dsv3_jax.aot.targets.parse_target(name, 1).environ(1)`.
   Linear growth from 4K to 32K to 128K is x8 then x4; quadratic x64 then x16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ROOT, append_section, device_line, table  # noqa: E402

GB = 1e9
V3 = "configs/deepseek-v3-671b.json"
SMOKE_RUN = False  # set by main: workers get --smoke too
IMPLS = ("blockwise", "dense")
FULL = dict(seqs="2048,4096,8192,16384", steps=3, prompt=16384, chunk=2048, new=4,
            layer_seqs="4096,32768,131072", targets="cpu,tpu-v5p,h100", layer_config=V3)
SMOKE = dict(seqs="512", steps=1, prompt=512, chunk=256, new=2, layer_seqs="256,512",
             targets="cpu", layer_config="configs/tiny-32k.json")
# --smoke trains and serves one dense layer without MTP (compiles in seconds, not half a minute)
SMOKE_MODEL = dict(num_hidden_layers=1, num_nextn_predict_layers=0)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout, the parent reads the last one."""
    print(json.dumps(result), flush=True)


def model_config(args):
    from dsv3_jax import ModelConfig
    cfg = ModelConfig.from_json(args.config)
    return cfg.replace(**SMOKE_MODEL) if args.smoke else cfg


def random_tokens(n: int, vocab: int, seed: int = 0):
    import numpy as np
    return np.random.default_rng(seed).integers(2, vocab, n).astype(np.int32)


# -- workers (each runs in its own process) -------------------------------------------------------

def train_worker(args) -> None:
    """Part 1, one configuration: compile the train step, then time --steps steps."""
    import jax
    from flax import nnx

    from dsv3_jax import init_model
    from dsv3_jax.layers.attention import implementation
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.step import train_step

    cfg = model_config(args)
    model = init_model(cfg, seed=0)
    optimizer = nnx.Optimizer(model, make_optimizer(model), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    batch = random_tokens(args.seq + 1, cfg.vocab_size).reshape(1, 1, args.seq + 1)

    def run(state, batches):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, batches)
        return nnx.state((model, optimizer)), metrics["loss"]

    t0 = time.perf_counter()
    with implementation(args.impl):
        compiled = jax.jit(run, donate_argnums=0).lower(state, batch).compile()
    m = compiled.memory_analysis()
    out = dict(seq=args.seq, impl=args.impl, compile_s=time.perf_counter() - t0,
               argument=m.argument_size_in_bytes, temp=m.temp_size_in_bytes,
               output=m.output_size_in_bytes, alias=m.alias_size_in_bytes)
    compiled_bytes = m.argument_size_in_bytes + m.temp_size_in_bytes
    if args.impl == "dense" and compiled_bytes > args.dense_budget_gb * GB:
        emit(dict(out, skipped=True, peak_rss=peak_rss()))
        return
    times, loss = [], None
    for i in range(args.steps + 1):  # the first call pays the buffers' first touch: not timed
        t0 = time.perf_counter()
        state, loss = compiled(state, batch)
        loss = float(loss)
        if i:
            times.append(time.perf_counter() - t0)
    emit(dict(out, skipped=False, step_s=statistics.median(times), steps=len(times), loss=loss,
              peak_rss=peak_rss()))


def serve_worker(args) -> None:
    """Part 2, one configuration: one long prompt through the engine, cold then warm."""
    from dsv3_jax import init_model
    from dsv3_jax.serve.engine import Engine, SamplingParams

    cfg = model_config(args)
    model = init_model(cfg, seed=0)
    # no prefix cache: the warm run repeats the prompt and must prefill it again, chunk by chunk
    engine = Engine(model, max_seq_len=args.prompt + args.new, max_batch=1, speculative=False,
                    prefill_chunk=args.chunk or None, prefix_cache=False)
    prompt = random_tokens(args.prompt, cfg.vocab_size, seed=1).tolist()
    runs = []
    for _ in range(2):  # cold (compiles), warm
        before = engine.stats()["prefills"]
        t0 = time.perf_counter()
        req = engine.submit(prompt, SamplingParams(max_new_tokens=args.new))
        tokens = req.result()
        runs.append((time.perf_counter() - t0, req.first_token_at - req.submitted_at, tokens,
                     engine.stats()["prefills"] - before))
    assert runs[0][2] == runs[1][2], "the warm request generated other tokens than the cold one"
    emit(dict(prompt=args.prompt, chunk=args.chunk, new=args.new, cold_s=runs[0][0],
              warm_s=runs[1][0], ttft_s=runs[1][1], tokens=runs[1][2], peak_rss=peak_rss(),
              prefills=runs[1][3]))


def layer_worker(args) -> None:
    """Part 3, one target: compile one V3 layer's forward + backward per length and attention."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv3_jax import ModelConfig
    from dsv3_jax.aot.targets import parse_target
    from dsv3_jax.layers.attention import implementation
    from dsv3_jax.layers.rope import rope_cos_sin
    from dsv3_jax.model import Block
    from sharding import make_mesh

    jax.config.update("jax_platforms", "cpu")
    target = parse_target(args.target, 1)
    cfg = ModelConfig.from_json(args.layer_config)
    bf16, f32 = jnp.bfloat16, jnp.float32
    mesh = make_mesh("", devices=target.devices(1))
    one = NamedSharding(mesh, P())
    block = nnx.eval_shape(lambda: Block(cfg, moe=False, rngs=nnx.Rngs(0), dtype=bf16,
                                         param_dtype=bf16))
    graphdef, params = nnx.split(block)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), params)

    def step(params, x):
        seq = x.shape[1]

        def loss(params, x):
            cos, sin = rope_cos_sin(cfg, jnp.arange(seq)[None])
            y, _ = nnx.merge(graphdef, params)(x, cos, sin)
            return jnp.mean(y.astype(f32))
        return jax.grad(loss, argnums=(0, 1))(params, x)

    kernels = {"tpu": 'custom_call_target="tpu_custom_call"', "cuda": "__cudnn$fmha"}
    for case in args.cases.split(","):
        seq, impl = int(case.split(":")[0]), case.split(":")[1]
        x = jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), bf16, sharding=one)
        row = dict(target=target.spec, device_kind=mesh.devices.flat[0].device_kind,
                   seq=seq, impl=impl)
        t0 = time.perf_counter()
        try:
            # a new function object per compile: jit's cache does not see the context
            with jax.set_mesh(mesh), implementation(None if impl == "default" else impl):
                compiled = jax.jit(lambda p, x: step(p, x)).lower(params, x).compile()
            m = compiled.memory_analysis()
            text = compiled.as_text()
            kernel = kernels.get(target.platform)
            row.update(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes,
                       output=m.output_size_in_bytes, compile_s=time.perf_counter() - t0,
                       kernel_calls=text.count(kernel) if kernel else 0,
                       loops=text.count(" while("))
        except Exception as e:  # noqa: BLE001  (a compiler that refuses: reported, not fatal)
            msg = " ".join(str(e).split())
            row.update(error=f"{type(e).__name__}: {msg[:300]}",
                       compile_s=time.perf_counter() - t0)
        print(f"  {row['target']:>14s} {seq:>7d} {impl:>9s}: "
              + (f"temp {row['temp'] / GB:8.2f} GB" if "temp" in row else row["error"][:120]),
              file=sys.stderr, flush=True)
        emit(row)


# -- driver ---------------------------------------------------------------------------------------

def run_worker(kind: str, extra: list[str], env: dict | None = None,
               timeout: float = 3600) -> list[dict]:
    """This script as `--worker KIND` in a fresh process; the JSON lines it printed."""
    rows, rc, err = start_worker(kind, extra, env, timeout)
    if rc and not rows:
        raise RuntimeError(f"--worker {kind} {' '.join(extra)} failed ({rc}):\n{err}")
    return rows


def start_worker(kind: str, extra: list[str], env: dict | None = None,
                 timeout: float = 3600) -> tuple[list[dict], int, str]:
    """(the JSON lines a `--worker KIND` process printed, its exit status, its stderr's tail)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    base["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *extra]
    if SMOKE_RUN:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, cwd=ROOT, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    print("\n".join(progress), file=sys.stderr, flush=True) if progress else None
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return rows, proc.returncode, proc.stderr[-3000:]


def git_commit() -> str:
    """The checkout's commit (`+ local changes` when the tracked files differ from it)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + (" + local changes" if git("status", "--porcelain", "--untracked-files=no").strip()
                   else "")


def kilo(n: int) -> str:
    """4096 -> "4K", 1000 -> "1000"."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def gb(x: float) -> str:
    return f"{x / GB:.2f}"


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def part_train(args) -> str:
    rows, by = [], {}
    for seq in [int(s) for s in args.seqs.split(",")]:
        for impl in IMPLS:
            t0 = time.perf_counter()
            r = run_worker("train", ["--config", args.config, "--seq", str(seq), "--impl", impl,
                                     "--steps", str(args.steps),
                                     "--dense-budget-gb", str(args.dense_budget_gb)])[-1]
            by[seq, impl] = r
            step = "OOM/skipped" if r["skipped"] else f"{r['step_s']:.2f}"
            print(f"  train seq {seq:6d} {impl:9s}: step {step} s, compiled "
                  f"{gb(r['argument'] + r['temp'])} GB, peak RSS {gib(r['peak_rss'])} GiB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for seq in sorted({s for s, _ in by}):
        b, d = by[seq, "blockwise"], by[seq, "dense"]
        rows.append([seq, f"{b['step_s']:.2f}",
                     "OOM/skipped" if d["skipped"] else f"{d['step_s']:.2f}",
                     "-" if d["skipped"] else f"{d['step_s'] / b['step_s']:.2f}x",
                     gb(b["temp"]), gb(d["temp"]), gib(b["peak_rss"]),
                     f"skipped ({gib(d['peak_rss'])})" if d["skipped"] else gib(d["peak_rss"]),
                     f"{b['compile_s']:.0f} / {d['compile_s']:.0f}"])
    return table(["seq", "blockwise step s", "dense step s", "dense / blockwise",
                  "blockwise compiled temp GB", "dense compiled temp GB",
                  "blockwise peak RSS GiB", "dense peak RSS GiB", "compile s (blockwise / dense)"],
                 rows)


def part_serve(args) -> str:
    rows, tokens = [], []
    for chunk in (0, args.chunk):
        r = run_worker("serve", ["--config", args.config, "--prompt", str(args.prompt),
                                 "--chunk", str(chunk), "--new", str(args.new)])[-1]
        tokens.append(r["tokens"])
        rows.append([args.prompt, f"{chunk} ({r['prefills']} prefill steps)" if chunk else
                     f"whole ({r['prefills']} prefill steps)", args.new, f"{r['cold_s']:.2f}",
                     f"{r['warm_s']:.2f}", f"{r['ttft_s']:.2f}", gib(r["peak_rss"])])
        print(f"  serve prompt {args.prompt} chunk {chunk or 'whole'}: {rows[-1][3:]}", flush=True)
    same = "identical" if tokens[0] == tokens[1] else "DIFFERENT"
    return (f"Greedy tokens, whole vs chunked prefill: **{same}**.\n\n"
            + table(["prompt tokens", "prefill chunk", "new tokens", "first request s (compiles)",
                     "second request s", "time to first token s", "peak RSS GiB"], rows))


def part_layer(args) -> str:
    from dsv3_jax.aot.targets import parse_target

    results = []
    for name in args.targets.split(","):
        target = parse_target(name, 1)
        impls = ("default", "blockwise", "dense") if target.platform != "cpu" else ("default", "dense")
        cases = [(int(s), i) for s in args.layer_seqs.split(",") for i in impls]
        t0, rows = time.perf_counter(), []
        while cases:  # a compiler that crashes on one case: the rest in a new process
            got, rc, err = start_worker(
                "layer", ["--target", name, "--layer-config", args.layer_config,
                          "--cases", ",".join(f"{s}:{i}" for s, i in cases)],
                env=target.environ(1))
            rows += got
            cases = cases[len(got):]
            if not cases or rc == 0:
                break
            seq, impl = cases.pop(0)
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            last = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("  ")][-1:] or [""]
            rows.append(dict(target=target.spec, seq=seq, impl=impl,
                             error=f"the compiler's process died ({how}) {last[0][:200]}"))
            print(f"  {target.spec} {seq} {impl}: {rows[-1]['error']}", flush=True)
        results += rows
        print(f"  layer {name}: {len(rows)} compiles in {time.perf_counter() - t0:.0f} s", flush=True)
    return layer_table(results), results


def layer_table(results: list[dict]) -> str:
    """Part 3's table: temporaries per target and attention vs length, growth, bytes per token."""
    from dsv3_jax.aot.targets import parse_target

    seqs = sorted({r["seq"] for r in results})
    out = []
    for (tgt, impl) in dict.fromkeys((r["target"], r["impl"]) for r in results):
        rs = {r["seq"]: r for r in results if r["target"] == tgt and r["impl"] == impl}
        kind = next((r.get("device_kind") for r in rs.values() if r.get("device_kind")), "")
        label = impl
        if impl == "default":
            k = next((r["kernel_calls"] for r in rs.values() if "kernel_calls" in r), 0)
            label = ("default: " + ({"tpu": "splash", "cuda": "cuDNN"}.get(
                parse_target(tgt.split(":")[0], 1).platform, "") if k else "blockwise"))
        cells = []
        for s in seqs:
            r = rs.get(s, {})
            err = r.get("error", "")
            need = re.search(r"required for HLO temporaries \(([\d.]+\w?)\)", err)
            cells.append(gb(r["temp"]) if "temp" in r else "-" if not r else
                         "compiler crashed" if "died" in err else
                         f"out of memory (needs {need.group(1)})" if need else
                         "out of memory" if "memory" in err.lower() else "error")
        growth, per_token = [], []
        for a, b in zip(seqs, seqs[1:]):
            if "temp" in rs.get(a, {}) and "temp" in rs.get(b, {}):
                growth.append(f"x{rs[b]['temp'] / rs[a]['temp']:.1f}")
                per_token.append(f"{(rs[b]['temp'] - rs[a]['temp']) / (b - a) / 1e6:.2f}")
            else:
                growth.append("-")
                per_token.append("-")
        out.append([f"{tgt} ({kind})", label, *cells, " / ".join(growth), " / ".join(per_token)])
    errors = [f"- {r['target']} {r['impl']} at {r['seq']}: `{r['error'][:240]}`"
              for r in results if "error" in r]
    steps = " / ".join(f"{kilo(a)}->{kilo(b)}" for a, b in zip(seqs, seqs[1:]))
    text = table(["target (device)", "attention", *[f"temp GB at {kilo(s)}" for s in seqs],
                  f"growth {steps} (linear: " + " / ".join(
                      f"x{b / a:g}" for a, b in zip(seqs, seqs[1:])) + ")",
                  f"MB per added token {steps} (linear: equal)"], out)
    if errors:
        text += "\n\nCompiler errors:\n" + "\n".join(errors)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("demo", "train", "serve", "layer", "all"), default="all",
                    help="demo = train + serve")
    ap.add_argument("--smoke", action="store_true", help="small shapes, CPU only (< 60 s)")
    ap.add_argument("--config", default="configs/tiny-32k.json")
    ap.add_argument("--seqs", default=None, help=f"train sequence lengths (default {FULL['seqs']})")
    ap.add_argument("--steps", type=int, default=None, help="timed train steps (median)")
    ap.add_argument("--dense-budget-gb", type=float, default=6.0,
                    help="dense train configurations compiled above this are not run")
    ap.add_argument("--prompt", type=int, default=None, help="serving prompt tokens")
    ap.add_argument("--chunk", type=int, default=None, help="prefill_chunk of the chunked run")
    ap.add_argument("--new", type=int, default=None, help="generated tokens per request")
    ap.add_argument("--layer-config", default=None, help=f"default {V3} (--smoke: the tiny one)")
    ap.add_argument("--layer-seqs", default=None, help=f"default {FULL['layer_seqs']}")
    ap.add_argument("--targets", default=None, help=f"default {FULL['targets']}")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to append to "
                    "(default BENCHMARKS.md; --smoke writes only with --out)")
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    ap.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    ap.add_argument("--worker", choices=("train", "serve", "layer"), help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        {"train": train_worker, "serve": serve_worker, "layer": layer_worker}[args.worker](args)
        return 0

    global SMOKE_RUN
    SMOKE_RUN = args.smoke
    t_start, commit_start = time.perf_counter(), git_commit()
    load_before = os.getloadavg()[0]
    parts = {"demo": ("train", "serve"), "all": ("train", "serve", "layer")}.get(
        args.part, (args.part,))
    sections, raw = [], {}
    if "train" in parts:
        print("1. train steps vs sequence length, blockwise vs dense attention", flush=True)
        t = part_train(args)
        print(t, flush=True)
        cfg = json.loads((ROOT / args.config).read_text())
        if args.smoke:
            cfg.update(SMOKE_MODEL)
        sections.append(
            f"Training on CPU: `{Path(args.config).name}` ({cfg['num_hidden_layers']} layers"
            f"{' + MTP' if cfg['num_nextn_predict_layers'] else ''}, "
            f"{cfg['num_attention_heads']} heads, positions to {cfg['max_position_embeddings']} "
            f"with YaRN), batch 1, the library's train step (loss, gradients, AdamW, bias update; "
            f"fp32, no remat: `train.py`'s defaults), each configuration in its own process. Step time: "
            f"median of {args.steps} steps after compile and one untimed step. Compiled temp: "
            f"`memory_analysis().temp_size_in_bytes` of the step (XLA:CPU). Peak RSS: the "
            f"process's `ru_maxrss` (model, optimizer state, compiler and JAX included). Dense "
            f"runs whose compiled arguments + temporaries exceed {args.dense_budget_gb:g} GB "
            f"are compiled but not run (OOM/skipped; their RSS is the compile's).\n\n{t}")
    if "serve" in parts:
        print("2. serving one long prompt", flush=True)
        t = part_serve(args)
        print(t, flush=True)
        sections.append(
            f"Serving on CPU: `Engine(max_batch=1, speculative=False)` with the same config and "
            f"random weights, one prompt of {args.prompt} random tokens and {args.new} greedy "
            f"tokens, the prompt prefilled whole and with `prefill_chunk={args.chunk}`, each in "
            f"its own process (prefill in the expanded blockwise form, decode absorbed).\n\n{t}")
    if "layer" in parts:
        print("3. one V3 layer's train step, compiled temporaries vs sequence length", flush=True)
        t, raw["layer"] = part_layer(args)
        lc = json.loads((ROOT / args.layer_config).read_text())
        print(t, flush=True)
        sections.append(
            f"One layer's train step compiled for one device (a dense `Block` of "
            f"`{Path(args.layer_config).name}`: hidden {lc['hidden_size']}, "
            f"{lc['num_attention_heads']} heads, q_lora {lc['q_lora_rank']}, kv_lora "
            f"{lc['kv_lora_rank']}, qk {lc['qk_nope_head_dim']} + {lc['qk_rope_head_dim']}, v "
            f"{lc['v_head_dim']}, FFN {lc['intermediate_size']}; bf16 parameters and compute, batch 1, "
            f"gradients w.r.t. parameters and input): `memory_analysis().temp_size_in_bytes`. "
            f"\"default\" is the target's own choice (blockwise on XLA:CPU, Pallas splash on "
            f"TPU, cuDNN flash attention on GPU; named by the kernel custom calls found in the "
            f"optimized HLO); \"blockwise\" forces the pure-JAX flash form; \"dense\" the whole "
            f"[heads, S, S] score matrix.\n\n{t}")
    commit, commit_end = commit_start, git_commit()
    if commit_end != commit:  # someone committed during the run: workers saw both trees
        commit = f"{commit} at the start, {commit_end} at the end"
    load = (f"Commit {commit}; 1-minute load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after; {time.perf_counter() - t_start:.0f} s in all")
    print(load)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    if not args.no_write and (args.out or not args.smoke):
        body = ("Smoke shapes: a test of the code paths, not a measurement.\n\n" if args.smoke
                else "") + "\n\n".join(sections) + f"\n\n{load}.\n"
        append_section("Long context: blockwise vs dense MLA attention", body,
                       path=args.out or ROOT / "BENCHMARKS.md")
    else:
        print(device_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
