"""Train a DeepSeek-V3-style model: `python train.py` trains configs/tiny.json on the Python
standard library's sources (no download) and saves checkpoints under runs/default.

Every flag is a field of dsv3_jax.train.loop.RunConfig; `python train.py --help` lists them.
"""

import argparse
import dataclasses
import sys

from dsv3_jax.host_memory import keep_freed_memory
from dsv3_jax.train.loop import RunConfig, TrainingError, train


def parse(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, metavar=f.name.upper())
    return RunConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    keep_freed_memory()  # before JAX starts: XLA:CPU's temporaries reused, not page-faulted
    try:
        train(parse())
    except (TrainingError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
