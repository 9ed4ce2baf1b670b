#!/usr/bin/env python3
"""PyTorch / transformers side of benchmarks/moe_speed.py: forward, training step and one MoE layer.

    /work/fixenv/bin/python benchmarks/hf_train_step.py --config configs/moe-64e.json \\
        --batch 4 --seq 256 --iters 10 --threads 2

(the venv: python3.11 + torch 2.13.0 CPU + transformers 5.23.0, as tests/fixtures/make_fixtures.py).

Builds a randomly initialised DeepseekV3ForCausalLM from a dsv3-jax config.json (as
benchmarks/hf_forward.py), fp32, eager attention and transformers' default experts implementation (grouped_mm,
`torch._grouped_mm`; --experts-implementation eager for the per-expert loop), and times, after one
untimed warm-up each:
  - `forward`: `model(ids)` under `torch.inference_mode()` (median seconds of --iters);
  - `step`: a training step, forward + next-token cross entropy + backward +
    `clip_grad_norm_(1.0)` + `torch.optim.AdamW` (lr 1e-3, weight decay 0.1) (median of --iters);
  - `moe_layer`: forward + backward of one MoE layer (`model.model.layers[first_k_dense_replace]
    .mlp`) on [1, --moe-tokens, hidden] activations with loss sum(y^2) (best of --iters),
    the same measurement as our side's.
Prints one JSON line with the three times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from _common import timed  # noqa: E402
from hf_forward import to_transformers_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--moe-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--parts", default="forward,step,moe_layer")
    ap.add_argument("--experts-implementation", default=None,
                    help="transformers' experts_implementation: None (its default, grouped_mm: "
                         "torch._grouped_mm), 'eager' (a loop over the hit experts), 'batched_mm'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw = json.loads(Path(args.config).read_text())
    config, model_cls = to_transformers_config(raw)
    model = model_cls._from_config(config, attn_implementation="eager",
                                   experts_implementation=args.experts_implementation,
                                   dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=gen)
    parts = args.parts.split(",")
    result = {"impl": "transformers", "batch": args.batch, "seq": args.seq,
              "threads": args.threads, "params": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__,
              "experts_implementation": model.config._experts_implementation}

    if "forward" in parts:
        model.eval()

        def forward():
            with torch.inference_mode():
                model(input_ids=ids[:, :-1], use_cache=False)

        result["forward_s"] = statistics.median(timed(forward, args.iters))

    if "step" in parts:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

        def step():
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        result["step_s"] = statistics.median(timed(step, args.iters))

    if "moe_layer" in parts:
        moe = model.model.layers[raw.get("first_k_dense_replace", 0)].mlp
        x = torch.randn(1, args.moe_tokens, config.hidden_size, generator=gen, requires_grad=True)

        def layer():
            y = moe(x)
            (y ** 2).sum().backward()
            moe.zero_grad(set_to_none=True)
            x.grad = None

        result["moe_layer_s"] = min(timed(layer, args.iters))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
