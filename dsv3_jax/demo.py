"""Generate greedily from a trained run, a HF checkpoint, or a random tiny model.

    python -m dsv3_jax.demo --run runs/default --prompt "def main("   # after `python train.py`
    python -m dsv3_jax.demo --checkpoint DIR --prompt-ids 1,2,3       # a HF checkpoint folder
    python -m dsv3_jax.demo                                           # configs/tiny.json, random

Decoding here re-runs the full forward on a fixed-size buffer each step (one compile, no
cache): a stand-in until the serving engine with the absorbed-MLA latent cache lands.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer, init_model
from dsv3_jax.weights import load_hf

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.json"


def greedy_generate(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` (full recompute per step over a fixed buffer)."""
    total = len(prompt) + max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context of {model.cfg.max_position_embeddings} positions")
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, buf, t):
        logits = nnx.merge(graphdef, state)(buf)
        return buf.at[0, t].set(jnp.argmax(logits[0, t - 1]).astype(buf.dtype))

    buf = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))
    for t in range(len(prompt), total):
        buf = step(state, buf, t)
    return [int(x) for x in np.asarray(buf[0, len(prompt):])]


def load_run(run_dir: str):
    """(model, tokenizer, step) from a train.py output folder's latest checkpoint."""
    import tokenizers

    from dsv3_jax.checkpoint import Checkpointer
    run = Path(run_dir)
    cfg = ModelConfig.from_json(run / "config.json")
    model = init_model(cfg)
    ckpt = Checkpointer(run / "checkpoints")
    extra = ckpt.restore(None, model)
    ckpt.close()
    return model, tokenizers.Tokenizer.from_file(str(run / "tokenizer.json")), extra["step"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config.json (random weights)")
    p.add_argument("--run", help="a train.py output folder (latest checkpoint + tokenizer.json)")
    p.add_argument("--checkpoint", help="HF checkpoint folder to load instead of random weights")
    p.add_argument("--prompt", default="def main(", help="prompt text (needs --run's tokenizer)")
    p.add_argument("--prompt-ids", default="1,2,3,4,5,6,7,8", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    tokenizer = None
    if args.run:
        model, tokenizer, step = load_run(args.run)
        source = f"{args.run} (step {step})"
    elif args.checkpoint:
        model = load_hf(args.checkpoint, dtype=jnp.float32)
        source = args.checkpoint
    else:
        cfg = ModelConfig.from_json(args.config)
        model = init_model(cfg, seed=args.seed)
        source = f"{args.config} (random weights, seed {args.seed})"
    cfg = model.cfg
    print(f"model: {source}")
    print(f"  {cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers "
          f"({cfg.num_dense_layers} dense + {cfg.num_moe_layers} MoE, {cfg.n_routed_experts} routed "
          f"experts, top-{cfg.num_experts_per_tok}), MTP depth {cfg.num_nextn_predict_layers}; "
          f"built in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}")
    if tokenizer is not None:
        prompt = tokenizer.encode(args.prompt).ids
    else:
        prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    t0 = time.perf_counter()
    out = greedy_generate(model, prompt, args.max_new_tokens)
    dt = time.perf_counter() - t0
    if tokenizer is not None:
        print(f"prompt:    {args.prompt!r}")
        print(f"generated: {tokenizer.decode(out)!r}")
    else:
        print(f"prompt ids:    {prompt}")
        print(f"generated ids: {out}")
    print(f"{len(out)} tokens in {dt:.1f}s (first step includes compilation)")


if __name__ == "__main__":
    main()
