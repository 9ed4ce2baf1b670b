"""Pipeline schedules on CPU: training step time vs micro-batch count, next to each schedule's
bubble computed from its table.

    .venv/bin/python benchmarks/pipeline_schedules.py [--mesh pipeline=4,data=2] \\
        [--microbatches 8,16] [--schedules gpipe,1f1b,zb,dualpipev]
    .venv/bin/python benchmarks/pipeline_schedules.py --smoke --out /tmp/B.md   # seconds-sized

Every schedule runs train.py's step (dsv3_jax/train/step.py) with `pipeline_schedule`: gpipe is
autodiff of the tick loop (sharding/pipeline.py), the others the explicit-backward executor
(sharding/pipeline_executor.py). The bubble columns come from the schedule's table
(sharding/schedule_table.py, F = 1, B = 2, W = 1): event-driven (each stage starts an action as
soon as its inputs exist: the DualPipe paper's timing) and lockstep (every tick lasts as long as
its slowest stage's action: how the SPMD tick loop runs). On 8 fake CPU devices sharing the
machine's cores, a step costs about the work of all devices together, so idle stages cost
nothing here, except GPipe's, whose idle slots compute on zeros; what the table's bubble costs
on real devices does not show up in these times. Bubble-free reference: the same step with all
devices on the data axis. Every run's loss equals the reference's. Appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import _common  # noqa: E402
from _common import append_section, median, table  # noqa: E402
from dsv3_jax import ModelConfig, init_model  # noqa: E402
from dsv3_jax.train.loop import replicate_unplaced  # noqa: E402
from dsv3_jax.train.optimizer import make_optimizer  # noqa: E402
from dsv3_jax.train.step import train_step  # noqa: E402
from sharding import make_mesh  # noqa: E402
from sharding.rules import batch_axes  # noqa: E402
from sharding.schedules import make_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Variant:
    """One compiled training step (mesh, schedule, micro-batches) with its own model."""

    def __init__(self, cfg, mesh_spec: str, schedule: str | None, microbatches: int | None,
                 batch: int, seq: int):
        self.mesh = make_mesh(mesh_spec)
        self.model = init_model(cfg, seed=0, mesh=self.mesh)
        self.optimizer = nnx.Optimizer(self.model, make_optimizer(self.model, lr=1e-3),
                                       wrt=nnx.Param)
        replicate_unplaced(self.optimizer, self.mesh)
        self.step = nnx.jit(functools.partial(train_step, microbatches=microbatches,
                                              pipeline_schedule=schedule or "gpipe"))
        rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1), np.int32)
        self.ids = jax.device_put(rows, NamedSharding(
            self.mesh, PartitionSpec(None, batch_axes(self.mesh), None)))
        self.times: list[float] = []
        t = time.perf_counter()
        self.loss = float(self.run()["loss"])  # compiles
        self.first = time.perf_counter() - t

    def run(self):
        with jax.set_mesh(self.mesh):
            return jax.block_until_ready(self.step(self.model, self.optimizer, self.ids))

    def time_one(self) -> None:
        t = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="pipeline=4,data=2")
    p.add_argument("--microbatches", default="8,16")
    p.add_argument("--schedules", default="gpipe,1f1b,zb,dualpipev")
    p.add_argument("--layers", type=int, default=9, help="num_hidden_layers of configs/tiny.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (pipeline=2,data=4, M=4, 5 layers, 16 x 16 tokens, 1 round)")
    p.add_argument("--out", default=None, help="the markdown file to append to (default BENCHMARKS.md)")
    p.add_argument("--no-append", dest="append", action="store_false")
    args = p.parse_args(argv)
    if args.smoke:
        args.mesh, args.microbatches, args.layers = "pipeline=2,data=4", "4", 5
        args.batch, args.seq, args.repeats = 16, 16, 1
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = ModelConfig.from_json(ROOT / "configs" / "tiny.json").replace(num_hidden_layers=args.layers)
    stages = make_mesh(args.mesh).shape["pipeline"]
    baseline = f"data={jax.device_count()}"
    load_before = os.getloadavg()[0]
    base = Variant(cfg, baseline, None, None, args.batch, args.seq)
    runs = {(s, int(m)): None for m in args.microbatches.split(",") for s in args.schedules.split(",")}
    for s, m in runs:
        runs[(s, m)] = Variant(cfg, args.mesh, s, m, args.batch, args.seq)
        v = runs[(s, m)]
        print(f"compiled {s} M={m} in {v.first:.0f} s, loss {v.loss:.6f} (unpipelined "
              f"{base.loss:.6f})", flush=True)
        if abs(v.loss - base.loss) > 1e-5 * abs(base.loss):
            raise SystemExit(f"{s} M={m}: loss {v.loss} differs from the unpipelined {base.loss}")
    for r in range(args.repeats):  # rounds alternate the runs, so load changes hit all alike
        for v in (base, *runs.values()):
            v.time_one()
        print(f"round {r + 1}: " + " ".join(f"{v.times[-1]:.2f}s" for v in (base, *runs.values())),
              flush=True)
    base_s = median(base.times)
    rows = [[f"{baseline} (no pipeline)", "-", "-", "-", "-", "-", f"{base_s * 1e3:.0f}", "1.00",
             f"{base.first:.0f}"]]
    for (s, m), v in runs.items():
        sched = make_schedule(s, stages, m)
        step_s = median(v.times)
        rows.append([s, m, sched.ticks, f"{sched.bubble_fraction():.1%}",
                     f"{sched.bubble_fraction(lockstep=True):.1%}", max(sched.peak_activations()),
                     f"{step_s * 1e3:.0f}", f"{step_s / base_s:.2f}", f"{v.first:.0f}"])
    headers = ["schedule", "micro-batches M", "ticks", "bubble (table, event-driven)",
               "bubble (table, lockstep)", "peak chunks in flight", "step ms (median)",
               "step x unpipelined", "compile + 1st step s"]
    out = table(headers, rows)
    print(out)
    if args.append:
        body = (f"configs/tiny.json with {args.layers} layers ({cfg.num_dense_layers} dense + "
                f"{cfg.num_moe_layers} MoE; {cfg.num_params() / 1e6:.1f}M parameters), fp32, one "
                f"training step on a batch of {args.batch} x {args.seq} tokens, {args.mesh} on 8 "
                f"fake CPU devices; median of {args.repeats} alternating rounds after the compile. "
                "Bubbles from each schedule's table with F = 1, B = 2, W = 1 (the largest "
                "stage's idle share); peak: micro-batch chunks whose activations a stage holds "
                "(dualpipev's chunks are half a stage). The fake devices share the cores, so "
                "these times measure the work of all stages, not the bubble (see "
                "benchmarks/pipeline_schedules.py); every loss equals the unpipelined one. "
                f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
                "after.\n\n" + out)
        path = Path(args.out) if args.out else _common.BENCHMARKS_MD
        append_section("Pipeline schedules on CPU: step time vs micro-batches", body, path=path)


if __name__ == "__main__":
    main()
