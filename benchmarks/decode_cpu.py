#!/usr/bin/env python3
"""Decode tokens/s and time to first token on CPU: our Engine vs transformers `generate()`.

    python benchmarks/decode_cpu.py                         # configs/tiny.json, ~4 minutes
    python benchmarks/decode_cpu.py --batches 1,8 --prompt 64 --new 64 --rounds 3 \\
        --contexts 128,512,1024,2048 --run runs/default --transformers-python /work/fixenv/bin/python

Three tables, appended to BENCHMARKS.md as one section (--no-append to skip):
1. Engine vs transformers on the same config and random fp32 weights (seed 0 for ours; the
   transformers model is randomly initialised too: speed does not depend on the values).
   Time to first token: one request of --prompt tokens, submit -> first token (prefill and
   sampling). Decode tokens/s: B prompts, `B * (N - 1) / (t(N new tokens) - t(1 new token))`,
   greedy, so prefill is excluded. Ours: `Engine(speculative=False)`, compiled programs warmed
   up first. Transformers: `generate(do_sample=False, use_cache=True, min_new_tokens=N)`, fp32,
   eager attention and expert loop, inference mode, one warm-up, in a subprocess of
   --transformers-python (python3.11 + torch CPU + transformers; see benchmarks/hf_forward.py),
   per metric the best of 1 and --threads (default: usable cores) torch threads, torch's default
   OpenMP settings. Rounds alternate; medians.
2. Per-step decode time vs filled context C (batch 8, every slot at position C - 1): the
   engine's jitted decode step with our absorbed MLA decode, next to the same step with
   MLA.decode swapped for a re-expanding one (each step runs the cached c_kv of every layer
   through kv_b_proj to per-head k_nope and v, as a latent cache without the absorption would;
   ~20x the per-position FLOPs on this config).
3. MTP speculative decoding on a trained checkpoint (--run, a train.py output folder; skipped
   when absent): acceptance rate, decode steps and tokens/s, speculative vs plain greedy (the
   tokens must be identical). Random weights never accept a draft, so table 1 runs without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_section, table, usable_cores  # noqa: E402


# -- transformers side (runs under --transformers-python) -----------------------------------------

def hf_worker(args) -> int:
    """Time transformers' generate() and print one JSON line."""
    import torch
    from hf_forward import to_transformers_config
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, model_cls = to_transformers_config(json.loads(Path(args.config).read_text()))
    model = model_cls._from_config(config, attn_implementation="eager",
                                   experts_implementation="eager", dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(0)

    def timed(batch: int, new: int) -> float:
        ids = torch.randint(2, config.vocab_size, (batch, args.prompt), generator=gen)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, use_cache=True)
        dt = time.perf_counter() - t0
        assert out.shape[1] == args.prompt + new, out.shape
        return dt

    result = {"ttft_s": 0.0, "decode": {}}
    with torch.inference_mode():
        timed(1, 2)  # warm-up
        result["ttft_s"] = statistics.median(timed(1, 1) for _ in range(3))
        for b in args.batch_list:
            t_n, t_1 = timed(b, args.new), timed(b, 1)
            result["decode"][str(b)] = b * (args.new - 1) / (t_n - t_1)
    print(json.dumps(result))
    return 0


def run_hf(args) -> dict:
    """One transformers round: its best of 1 and `--threads` torch threads per metric, with
    torch's default OpenMP settings (OMP_WAIT_POLICY=PASSIVE, used before 2026-11-22 16:00,
    made its TTFT 4x and its batch-8 decode 5x slower on an idle machine)."""
    best = None
    for threads in sorted({1, args.threads}):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        cmd = [args.transformers_python, __file__, "--hf-worker", "--config", args.config,
               "--prompt", str(args.prompt), "--new", str(args.new), "--batches", args.batches,
               "--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"transformers run failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stderr[-3000:]}")
        res = json.loads(lines[-1])
        if best is None:
            best = res
        else:
            best["ttft_s"] = min(best["ttft_s"], res["ttft_s"])
            best["decode"] = {b: max(v, res["decode"][b]) for b, v in best["decode"].items()}
    return best


# -- our side --------------------------------------------------------------------------------

def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np
    return np.random.default_rng(seed).integers(2, vocab, (n, length)).tolist()


def ours(engines: dict, args) -> dict:
    """TTFT and decode tokens/s of warmed-up engines (one per batch size)."""
    from dsv3_jax.serve.engine import SamplingParams

    e1 = engines[1]
    cfg = e1.cfg
    ttft = []
    for i in range(3):
        req = e1.submit(prompts(1, args.prompt, cfg.vocab_size, seed=100 + i)[0],
                        SamplingParams(max_new_tokens=1))
        req.result()
        ttft.append(req.first_token_at - req.submitted_at)
    decode = {}
    for b, e in engines.items():
        ps = prompts(b, args.prompt, cfg.vocab_size, seed=b)
        t0 = time.perf_counter()
        e.generate(ps, args.new)
        t_n = time.perf_counter() - t0
        t0 = time.perf_counter()
        e.generate(ps, 1)
        t_1 = time.perf_counter() - t0
        decode[str(b)] = b * (args.new - 1) / (t_n - t_1)
    return {"ttft_s": statistics.median(ttft), "decode": decode}


ABSORBED = None  # MLA.decode as shipped, set by step_ms_vs_context


def reexpanding_decode(self, x, cos, sin, cache, start):
    """MLA decode WITHOUT absorption: every step expands the whole cached latent through
    kv_b_proj into per-head k_nope and v (the baseline for table 2)."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.layers.linear import project
    from dsv3_jax.layers.mla import LatentCache, causal_mask

    if cache is None:  # prefill: nothing cached to expand
        return ABSORBED(self, x, cos, sin, cache, start)
    f32 = jnp.float32
    q_nope, q_pe = self.query(x, cos, sin)
    c_kv, k_pe = self.latent(x, cos, sin)
    ckv_all = jnp.concatenate([cache.c_kv, c_kv], axis=1)
    kpe_all = jnp.concatenate([cache.k_pe, k_pe], axis=1)
    kv = project(ckv_all, self.kv_b_proj[...], 1, self.precision)  # [b, T + s, H, nope + v]
    nope = self.cfg.qk_nope_head_dim
    k_nope, v = kv[..., :nope], kv[..., nope:]
    scores = (jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=f32)
              + jnp.einsum("bshd,btd->bhst", q_pe, kpe_all, preferred_element_type=f32)) * self.softmax_scale
    s, t_old = x.shape[1], cache.c_kv.shape[1]
    valid_old = jnp.arange(t_old)[None, :] < start[:, None]
    mask = jnp.concatenate([jnp.broadcast_to(valid_old[:, None, :], (x.shape[0], s, t_old)),
                            jnp.broadcast_to(causal_mask(s), (x.shape[0], s, s))], axis=-1)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhst,bthd->bshd", probs, v, preferred_element_type=f32).astype(self.dtype)
    return project(o, self.o_proj[...], 2, self.precision), LatentCache(c_kv, k_pe)


def step_ms_vs_context(model, args) -> list[list]:
    """Per-step ms of the engine's jitted decode step with all 8 slots at context C (new token
    at position C - 1, window C), absorbed vs re-expanding; the cache's values do not change
    the cost, so no prefill is needed. Best of 3 x 10 steps."""
    import jax
    import numpy as np

    from dsv3_jax.layers import mla
    from dsv3_jax.serve import steps
    from dsv3_jax.serve.engine import Engine

    global ABSORBED
    contexts = [int(c) for c in args.contexts.split(",")]
    batch = 8
    rows = []
    absorbed = ABSORBED = mla.MLA.decode
    for name, method in (("absorbed", absorbed), ("re-expanding", reexpanding_decode)):
        mla.MLA.decode = method
        steps._JITTED.clear()  # the memo is keyed on the structure, not on the method
        try:
            e = Engine(model, max_seq_len=max(contexts), max_batch=batch, speculative=False)
            last, active = np.zeros(batch, np.int32), np.ones(batch, bool)
            sp = e._sampling(np.arange(batch))
            for c in contexts:
                pos = np.full(batch, c - 1, np.int32)

                def run(n):
                    for _ in range(n):
                        tok, _, e._cache, _ = e._decode_fn(e._weights, e._cache, last, pos, active, sp,
                                                        window=c)
                    jax.block_until_ready(tok)

                run(1)  # compile this window
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    run(10)
                    ts.append((time.perf_counter() - t0) / 10 * 1000)
                rows.append([name, c, f"{min(ts):.2f}"])
                print(f"  {name:12s} context {c:5d}: {min(ts):7.2f} ms/step", flush=True)
        finally:
            mla.MLA.decode = absorbed
            steps._JITTED.clear()
    return rows


def speculative_on_run(run_dir: str, args) -> tuple[list[list], str] | None:
    """Speculative vs plain greedy on a trained checkpoint with its tokenizer."""
    from dsv3_jax.demo import load_run
    from dsv3_jax.serve.engine import Engine

    if not (Path(run_dir) / "checkpoints").exists():
        print(f"  no trained run at {run_dir}: skipping the speculative table")
        return None
    model, tok, step = load_run(run_dir)
    texts = ["def main(", "import os\nimport sys\n", "class Config:\n    def __init__(self",
             "for i in range(", "The ", "if __name__ == ", "return ", "# "]
    ps = [tok.encode(t).ids for t in texts]
    out, rows = {}, []
    for spec in (False, True):
        e = Engine(model, max_seq_len=256, max_batch=8, speculative=spec)
        e.generate(ps, 8)  # warm-up
        before = e.stats()
        t0 = time.perf_counter()
        out[spec] = e.generate(ps, args.new)
        dt = time.perf_counter() - t0
        s = {k: e.stats()[k] - before[k] for k in ("decode_steps", "drafted", "accepted", "tokens_generated")}
        rate = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
        rows.append(["MTP speculative" if spec else "plain", s["decode_steps"],
                     f"{rate:.2f}" if spec else "-", f"{s['tokens_generated'] / dt:.0f}"])
        print(f"  {rows[-1]}", flush=True)
    same = "identical" if out[True] == out[False] else "DIFFERENT"
    note = (f"MTP speculative decoding on the trained run `{run_dir}` (step {step}), {len(ps)} "
            f"code/text prompts, {args.new} new tokens each, greedy, batch 8 (tokens/s include "
            f"the prefill); speculative output vs plain: **{same}**. On this CPU a speculative "
            f"step (2 positions through the model, plus the MTP block) costs about as much as "
            f"the tokens it saves; it pays where a decode step is bound by reading the weights "
            f"(large models on GPU), where 2 positions cost about what 1 does.")
    return rows, note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.json")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--run", default="runs/default", help="trained run for the speculative table")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--transformers-python", default="/work/fixenv/bin/python")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",")]
    if args.hf_worker:
        return hf_worker(args)

    from dsv3_jax import ModelConfig, init_model
    from dsv3_jax.serve.engine import Engine

    cfg = ModelConfig.from_json(args.config)
    # room for the context sweep; RoPE/YaRN do not depend on this field
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, 4096))
    model = init_model(cfg, seed=0)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    print("1. engine vs transformers", flush=True)
    # no prefix cache: every round repeats its prompts, and transformers' generate has none
    engines = {b: Engine(model, max_seq_len=args.prompt + args.new, max_batch=b, speculative=False,
                         prefix_cache=False)
               for b in sorted(set(args.batch_list) | {1})}
    for b, e in engines.items():  # compile the prefill bucket and decode window of each
        e.generate(prompts(b, args.prompt, cfg.vocab_size), 2)
    have_hf = Path(args.transformers_python).exists()
    results = {"ours": [], "transformers": []}
    for r in range(args.rounds):
        for impl in ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours"):
            if impl == "transformers" and not have_hf:
                continue
            res = ours(engines, args) if impl == "ours" else run_hf(args)
            results[impl].append(res)
            print(f"  round {r + 1} {impl:12s} ttft {res['ttft_s'] * 1000:7.1f} ms  decode "
                  + "  ".join(f"b{b}: {v:7.0f} tok/s" for b, v in res["decode"].items()), flush=True)

    def med(impl, key, b=None):
        runs = results[impl]
        return statistics.median(x["ttft_s"] if b is None else x["decode"][str(b)] for x in runs)

    impls = [i for i in ("ours", "transformers") if results[i]]

    def per_round(impl, b=None, scale=1.0):
        return " ".join(f"{(x['ttft_s'] if b is None else x['decode'][str(b)]) * scale:.0f}"
                        for x in results[impl])

    headers = ["metric", "dsv3-jax Engine", "transformers generate", "speed-up",
               "ours per round", "transformers per round"]
    rows = [["time to first token, ms (1 x %d prompt)" % args.prompt]
            + [f"{med(i, 'ttft') * 1000:.1f}" for i in impls]]
    if len(impls) == 2:
        rows[0] += [f"{med('transformers', 'ttft') / med('ours', 'ttft'):.1f}x",
                    per_round("ours", scale=1000), per_round("transformers", scale=1000)]
    for b in args.batch_list:
        row = [f"decode tokens/s, batch {b}"] + [f"{med(i, 'decode', b):.0f}" for i in impls]
        if len(impls) == 2:
            row += [f"{med('ours', 'decode', b) / med('transformers', 'decode', b):.1f}x",
                    per_round("ours", b), per_round("transformers", b)]
        rows.append(row)
    if len(impls) == 1:
        headers = headers[:2]
    table1 = table(headers, rows)
    print(table1, flush=True)

    print("2. per-step decode time vs context", flush=True)
    rows2 = step_ms_vs_context(model, args)
    by = {(n, c): float(ms) for n, c, ms in rows2}
    contexts = sorted({c for _, c, _ in rows2})
    table2 = table(["filled context", "absorbed ms/step", "re-expanding ms/step"],
                   [[c, f"{by[('absorbed', c)]:.2f}", f"{by[('re-expanding', c)]:.2f}"] for c in contexts])
    print(table2, flush=True)

    print("3. MTP speculative decoding on a trained run", flush=True)
    spec = speculative_on_run(args.run, args)
    table3 = ""
    if spec:
        table3 = spec[1] + "\n\n" + table(["decoding", "decode steps", "acceptance", "tokens/s"], spec[0])
        print(table3)

    load = f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"{load}; {time.perf_counter() - t_start:.0f}s")
    if not args.no_append:
        versions = ""
        if have_hf:
            versions = subprocess.run(
                [args.transformers_python, "-c", "import torch, transformers; "
                 "print(f'torch {torch.__version__}, transformers {transformers.__version__}')"],
                capture_output=True, text=True).stdout.strip()
        body = (f"Config `{Path(args.config).name}`, fp32, random weights; prompts of {args.prompt} "
                f"random tokens, {args.new} new tokens, greedy. Ours: `Engine(speculative=False)` "
                f"(absorbed-MLA latent cache, continuous batching), compile excluded. Transformers "
                f"({versions}): `generate(do_sample=False, use_cache=True)`, eager attention and "
                f"expert loop, per metric the best of 1 and {args.threads} torch threads (default "
                f"OpenMP settings). Decode "
                f"tokens/s = B (N - 1) / (t(N tokens) - t(1 token)); TTFT = submit to first token "
                f"of one request. {args.rounds} alternating rounds, medians. {load}.\n\n{table1}\n\n"
                f"Per-step time of the engine's jitted decode step vs filled context C (batch 8, "
                f"every slot at position C - 1, attention window C), absorbed MLA decode vs the "
                f"same step with a decode that re-expands the cached latent through kv_b_proj "
                f"every step (best of 3 x 10 steps):\n\n{table2}\n\n{table3}\n")
        append_section("Decode on CPU: Engine (absorbed-MLA cache) vs transformers generate", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
