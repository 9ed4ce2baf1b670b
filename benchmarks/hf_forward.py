#!/usr/bin/env python3
"""Forward-pass throughput of Hugging Face transformers' DeepSeek model (the CPU baseline).

    /work/fixenv/bin/python benchmarks/hf_forward.py --config configs/tiny.json \\
        --batch 2 --seq 128 --iters 10 --threads 8

(the venv: see tests/fixtures/make_fixtures.py; python3.11 + torch 2.13.0 CPU + transformers 5.23.0).

Builds a randomly initialised DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for model_type
deepseek_v2) from a dsv3-jax config.json (HF field names, official DeepSeek dialect with
rope_theta + rope_scaling{"type": "yarn"} or transformers-5 dialect with rope_parameters),
float32, attn_implementation="eager" and the eager expert loop, torch.set_num_threads(T), runs
under torch.inference_mode(), warms up once, times N forwards of one [B, S] random batch (no cache,
no attention mask) and prints one JSON line:

    {"impl": "transformers", "tokens_per_s": ..., "ms_per_forward": ..., "batch": B, "seq": S, ...}

quantization_config is dropped (the model is fp32); MTP layers are not part of the forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

ARCH = {
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
}

# Keys of the official config.json that are not config fields transformers needs (or that would
# change what is built): dropped before building the config.
_DROP = {"quantization_config", "auto_map", "architectures", "torch_dtype", "dtype", "transformers_version"}


def to_transformers_config(raw: dict):
    """dsv3-jax / official / transformers-5 config.json -> transformers config object."""
    model_type = raw.get("model_type")
    if model_type not in ARCH:
        raise SystemExit(f"unknown model_type {model_type!r} (expected one of {sorted(ARCH)})")
    config_cls, model_cls = ARCH[model_type]
    cfg = {k: v for k, v in raw.items() if k not in _DROP}
    rope = cfg.pop("rope_parameters", None)
    scaling = cfg.pop("rope_scaling", None)
    theta = cfg.pop("rope_theta", None)
    if rope is None:
        rope = {}
        if scaling:
            rope.update({k: v for k, v in scaling.items() if k != "type"})
            rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        else:
            rope["rope_type"] = "default"
        rope["rope_theta"] = float(theta if theta is not None else 10000.0)
    else:
        rope = dict(rope)
        if theta is not None:
            rope.setdefault("rope_theta", float(theta))
    cfg["rope_parameters"] = rope
    if model_type == "deepseek_v3" and "num_nextn_predict_layers" in cfg:
        cfg["num_mtp_layers"] = cfg.pop("num_nextn_predict_layers")
    # scoring_func / topk_method (V3) are implied by model_type in transformers; keep them harmlessly.
    return config_cls(**cfg), model_cls


def main() -> int:
    ap = argparse.ArgumentParser(description="transformers DeepSeek forward throughput (CPU, fp32, eager)")
    ap.add_argument("--config", required=True, help="config.json (HF field names)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.config) as fh:
        raw = json.load(fh)
    config, model_cls = to_transformers_config(raw)
    model = model_cls._from_config(
        config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    model.eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))

    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.iters):
            model(input_ids=ids, use_cache=False)
        dt = time.perf_counter() - t0

    ms = 1000.0 * dt / args.iters
    result = {
        "impl": "transformers",
        "tokens_per_s": args.batch * args.seq * args.iters / dt,
        "ms_per_forward": ms,
        "batch": args.batch,
        "seq": args.seq,
        "iters": args.iters,
        "threads": args.threads,
        "model_type": raw["model_type"],
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
