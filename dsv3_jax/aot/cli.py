"""`python -m dsv3_jax.aot`: compile one real step for a target, print its memory and audit.

    python -m dsv3_jax.aot --config configs/deepseek-v2-lite.json --mesh expert=16,fsdp=4 \\
        --batch 64 --seq 4096 --target tpu-v5p:4x4x4
    python -m dsv3_jax.aot ... --serve --step prefill --target h200:2x8 --json out.json

The compile runs in this process, which must not have started JAX's backend yet: the target's
environment (JAX_PLATFORMS=cpu, its XLA_FLAGS, the fake CPU device count) is set first.
`run_subprocess` runs it in a fresh process for scripts and tests. `--max-memory-gb` caps the
process's address space (RLIMIT_AS) and fails if the peak RSS exceeds it: proof that no
parameter is materialised.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys

from dsv3_jax.aot.targets import NAMES, TargetError, parse_target
from sharding.mesh import MeshError
from sharding.pipeline import PipelineError


def run_subprocess(args: list[str], *, timeout: float = 1800) -> dict:
    """Run `python -m dsv3_jax.aot ARGS --json -` in a fresh process; its result as a dict."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "dsv3_jax.aot", *args, "--json", "-"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"dsv3_jax.aot {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from dsv3_jax import plan, plan_cli
    from dsv3_jax.aot import audit

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    plan_cli.add_setup_args(ap)
    ap.add_argument("--target", default="cpu",
                    help=f"NAME[:TOPOLOGY], NAME one of {', '.join(NAMES)}; TOPOLOGY a TPU chip "
                         "grid (4x4x4, 16x16) or HOSTSxGPUS (32x8); default: the smallest "
                         "standard one with the mesh's device count")
    ap.add_argument("--step", choices=("train", "decode", "prefill"), default=None,
                    help="default: train, or decode with --serve (prefill needs --serve)")
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="cap this process's address space (RLIMIT_AS) and fail if peak RSS "
                         "exceeds it: proof that no parameter is materialised")
    ap.add_argument("--json", default=None, help="write the result as JSON to this file ('-': stdout)")
    ap.add_argument("--hlo", default=None, help="write the optimized HLO (what the audit reads) here")
    ap.add_argument("--dump", default=None, help="XLA dump folder (buffer assignment, HLO)")
    args = ap.parse_args(argv)
    if args.step and (args.step == "train") == args.serve:
        ap.error(f"--step {args.step} {'without' if args.serve else 'needs'} --serve")
    try:
        setup = plan_cli.setup_from_args(args)
        plan.check_batch(setup)
        target = parse_target(args.target, setup.devices)
    except (TargetError, MeshError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = target.environ(setup.devices)
    if args.dump:
        env["XLA_FLAGS"] += (f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text "
                             "--xla_dump_hlo_module_re=jit_")
    os.environ.update(env)
    limit = None
    if args.max_memory_gb:
        limit = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import jax
    jax.config.update("jax_platforms", "cpu")
    from dsv3_jax.aot.compile import compile_step
    try:
        result = compile_step(setup, target, args.step)
    except (TargetError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if limit is not None and result.peak_rss > limit:
        raise SystemExit(f"peak RSS {result.peak_rss / 2**30:.2f} GiB exceeds the limit of "
                         f"{args.max_memory_gb} GiB")
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(result.hlo_text)
    estimate = plan.estimate(setup, target.platform) if result.kind != "prefill" else None
    out = dict(dataclasses.asdict(result), total=result.total,
               planner=estimate.as_dict() if estimate else None, setup=setup.describe(),
               routed_rows=routed_rows(setup, result.kind),
               pair_overlap=pair_overlap(setup, result))
    if args.json == "-":
        print(json.dumps(out))
        return 0
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(out) + "\n")
    print(f"{setup.describe()}\n{result.kind} step compiled for {target.spec} "
          f"({setup.devices} x {result.device_kind}) in {result.lower_s:.0f} + "
          f"{result.compile_s:.0f} s")
    if estimate:
        print(plan_cli.comparison_table([(setup, result, estimate)]))
    else:
        print(f"compiler: {result.total / 1e9:.2f} GB per device (the planner estimates train and "
              "decode steps)")
    device = plan.DEVICES.get(target.planner_device or "")
    if device:
        verdict = "FITS" if plan.fits(result.total, device) else "DOES NOT FIT"
        print(f"{device.name} ({device.memory / 1e9:.1f} GB, {1 - plan.HEADROOM:.0%} usable), "
              f"compiler's figure: {verdict}")
    print(audit.table(result.audit, estimate.flops_per_step / setup.devices if estimate else None,
                      routed_rows(setup, result.kind)))
    if result.buffers:
        per = setup.devices // setup.stages
        print(f"pipeline executor buffers per stage / its {per} devices (sharding/"
              "pipeline_executor.py; an even split assumed): " + ", ".join(
                  f"{k} {v / per / 1e9:.3g} GB" for k, v in result.buffers.items() if v))
    if out["pair_overlap"]:
        print("dualpipev F&B pair loops (dsv3_jax/aot/overlap.py): "
              + ", ".join(f"{k} {v['count']} ({v['async']} async, {v['with_other_half']} with the "
                          f"other chunk's matmuls inside)"
                          for k, v in out["pair_overlap"]["collectives"].items()))
    return 0


def pair_overlap(setup, result) -> dict | None:
    """For a dualpipev train step: its F&B pairs' collectives and what overlaps them."""
    if result.kind != "train" or setup.stages < 2 or setup.pipeline_schedule != "dualpipev":
        return None
    from dsv3_jax.aot.overlap import pair_overlap as overlap
    from sharding.schedule_program import compile_program
    from sharding.schedules import make_schedule
    prog = compile_program(make_schedule("dualpipev", setup.stages, setup.microbatches))
    pairs = [k for k, ops in enumerate(prog.branches) if {kind for kind, _ in ops} == {"F", "BW"}]
    return overlap(result.hlo_text, pairs)


def routed_rows(setup, kind: str) -> float | None:
    """(token, expert) rows one device's experts receive per MoE layer call on average (train:
    one micro-batch's tokens, split over the devices of a pipeline stage; decode: one token per
    slot); None for prefill or a model without routed experts."""
    cfg = setup.config
    if not cfg.n_routed_experts or kind not in ("train", "decode"):
        return None
    tokens = (setup.batch * setup.seq / (setup.accumulate * setup.microbatches)
              if kind == "train" else setup.batch)
    return tokens * cfg.num_experts_per_tok * setup.stages / setup.devices


if __name__ == "__main__":
    sys.exit(main())
