"""FP8 training on meshes vs one device: per-step loss differences over 10 steps, next to a
single-device control that changes only the fp32 summation order (`--accumulate 2`).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/fp8_mesh_trajectories.py

FP8 rounds every activation, gradient and weight tile to e4m3 (3 mantissa bits): a 1e-7
difference in fp32 (another reduction order) flips some roundings by a whole e4m3 step, and the
trajectories drift apart after the first update. fp32 runs stay within 1e-7. A mesh run is as
close to the one-device run as the control is: same function, chaotic rounding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import append_section, table  # noqa: E402
from dsv3_jax.train.loop import RunConfig, train  # noqa: E402

MESHES = ("expert=8", "data=2,tensor=2,expert=2", "pipeline=2,expert=4")


def losses(precision: str, out: Path, steps: int, **kw) -> np.ndarray:
    shutil.rmtree(out, ignore_errors=True)
    run = RunConfig(config="configs/tiny.json", corpus=str(Path(json.__file__).parent), steps=steps,
                    batch_size=8, seq_len=32, warmup_steps=10, checkpoint_every=steps, out=str(out),
                    precision=precision, **kw)
    return np.array([h["loss"] for h in train(run, log=lambda *a: None)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="fp32,fp8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-append", action="store_true", help="print only")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            ref = losses(precision, Path(tmp) / "single", args.steps)
            runs = [("one device, --accumulate 2 (control)", dict(accumulate=2))]
            runs += [(f"--mesh {m}", dict(mesh=m)) for m in MESHES]
            for name, kw in runs:
                rel = np.abs(losses(precision, Path(tmp) / "run", args.steps, **kw) - ref) / ref
                rows.append([precision, name, f"{rel[:2].max():.1e}", f"{rel.max():.1e}",
                             " ".join(f"{r:.0e}" for r in rel)])
                print(table(["precision", "run", "steps 0-1", f"max over {args.steps}", "per step"],
                            rows[-1:]), flush=True)
    body = ("Loss of each step relative to the same run on one device (tiny config, batch 8 x 32, "
            "the json package's sources). Steps 0-1 compare one function of the same weights; "
            "later steps compare trajectories.\n\n"
            + table(["precision", "run", "steps 0-1", f"max over {args.steps}", "per step"], rows))
    print(body)
    if not args.no_append:
        append_section("FP8 training on meshes: trajectories vs one device", body)


if __name__ == "__main__":
    main()
