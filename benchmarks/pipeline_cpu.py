"""Pipeline training step time vs micro-batch count, against GPipe's theoretical bubble.

    .venv/bin/python benchmarks/pipeline_cpu.py [--mesh pipeline=4,data=2] [--microbatches 1,2,4,8]

On 8 fake CPU devices sharing the machine's cores, a step costs about the work of all devices
together, and a pipeline's idle slots are not idle here: they compute on zeros (as the schedule
does everywhere, sharding/pipeline.py), so the bubble shows up as extra work, which is what it
costs in time on real devices. Theory for the pipelined layers: (M + P - 1) / M times their
bubble-free work; the embedding, dense layers, head and MTP run outside the pipeline without a
bubble, so the whole step should take (1 - f) + f (M + P - 1) / M of the bubble-free run, with f
the pipelined layers' share of the step's FLOPs (dsv3_jax/train/flops.py). Bubble-free
reference: the same step with the same devices all on the data axis. Appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from _common import append_section, median, table  # noqa: E402
from pipeline_schedules import Variant  # noqa: E402 -- one compiled step per (mesh, M)
from dsv3_jax import ModelConfig  # noqa: E402
from dsv3_jax.train.flops import flops_per_token  # noqa: E402
from sharding import make_mesh  # noqa: E402
from sharding.pipeline import plan_stages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pipelined_share(cfg: ModelConfig, plan, seq: int) -> float:
    """Share of a step's FLOPs in the pipelined MoE layers."""
    per_layer = flops_per_token(cfg.replace(num_hidden_layers=cfg.num_hidden_layers + 1), seq) - \
        flops_per_token(cfg, seq)
    return plan.stages * plan.moe_per_stage * per_layer / flops_per_token(cfg, seq)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="pipeline=4,data=2")
    p.add_argument("--microbatches", default="1,2,4,8")
    p.add_argument("--layers", type=int, default=9, help="num_hidden_layers of configs/tiny.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-append", dest="append", action="store_false", help="do not write BENCHMARKS.md")
    args = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = ModelConfig.from_json(ROOT / "configs" / "tiny.json").replace(num_hidden_layers=args.layers)
    stages = make_mesh(args.mesh).shape["pipeline"]
    baseline = f"data={jax.device_count()}"
    load_before = os.getloadavg()[0]

    base = Variant(cfg, baseline, None, None, args.batch, args.seq)
    ms = [int(v) for v in args.microbatches.split(",")]
    plans = {m: plan_stages(cfg, stages, m) for m in ms}
    variants = {m: Variant(cfg, args.mesh, "gpipe", m, args.batch, args.seq) for m in ms}
    print(f"compiled {1 + len(ms)} steps", flush=True)
    for m, v in variants.items():
        if abs(v.loss - base.loss) > 1e-5 * abs(base.loss):
            raise SystemExit(f"M={m}: loss {v.loss} differs from the unpipelined {base.loss}")
    for r in range(args.repeats):  # rounds alternate the runs, so load changes hit all alike
        for v in (base, *variants.values()):
            v.time_one()
        print(f"round {r + 1}: " + " ".join(f"{v.times[-1]:.2f}s" for v in (base, *variants.values())),
              flush=True)
    base_s = median(base.times)
    rows = [[f"{baseline} (no pipeline)", "-", "-", "-", "1.00", f"{base_s * 1e3:.0f}", "1.00",
             f"{base.first:.0f}"]]
    f = pipelined_share(cfg, plans[ms[0]], args.seq)
    for m, v in variants.items():
        theory_layers = (m + stages - 1) / m
        step_s = median(v.times)
        rows.append([args.mesh, m, f"{plans[m].bubble:.1%}", f"{theory_layers:.2f}",
                     f"{(1 - f) + f * theory_layers:.2f}", f"{step_s * 1e3:.0f}",
                     f"{step_s / base_s:.2f}", f"{v.first:.0f}"])
    plan = plans[ms[0]]
    headers = ["run", "micro-batches M", "bubble (P-1)/(M+P-1)", "theory: pipelined layers x",
               "theory: step x", "step ms (median)", "measured step x", "compile + 1st step s"]
    out = table(headers, rows)
    print(out)
    if args.append:
        body = (f"configs/tiny.json with {args.layers} layers ({cfg.num_dense_layers} dense + "
                f"{cfg.num_moe_layers} MoE; {cfg.num_params() / 1e6:.1f}M parameters), fp32, one "
                f"training step (forward, backward, AdamW, bias update) on a batch of {args.batch} "
                f"x {args.seq} tokens, 8 fake CPU devices; median of {args.repeats} alternating "
                f"rounds after the compile. P = {stages} stages of {plan.moe_per_stage} MoE layers; the "
                f"pipelined layers are f = {f:.0%} of the step's FLOPs, so theory for the whole "
                f"step is (1 - f) + f (M + P - 1) / M times the bubble-free {baseline} run "
                "(x columns). Fake devices share the cores, so the bubble's idle slots cost "
                "their compute on zeros here; every M's loss equals the unpipelined one. "
                f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
                "after.\n\n" + out)
        append_section("Pipeline parallelism on CPU: step time vs micro-batches (GPipe)", body)


if __name__ == "__main__":
    main()
