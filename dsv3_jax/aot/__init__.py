"""Ahead-of-time compilation of the real steps for clusters we do not have, with the real compilers.

    python -m dsv3_jax.aot --config configs/deepseek-v2-lite.json --mesh expert=16,fsdp=4 \\
        --batch 64 --seq 4096 --target tpu-v5p:4x4x4      # or h100:8x8, cpu (fake devices)

- targets.py: the targets (fake CPU devices, TPU slices from libtpu, GPU hosts through XLA:GPU's
  deviceless compilation) and the environment each compile needs;
- compile.py: the train, decode and prefill steps lowered from sharded abstract inputs,
  compiled, and measured (`memory_analysis`, `cost_analysis`);
- hlo.py: the optimized HLO text read into computations, how often each runs, source lines;
- audit.py: what the optimized HLO communicates (collectives, bytes, asynchrony, the largest
  all-gather) and multiplies (matmuls by operand dtype, FLOPs);
- cli.py: the command line (`python -m dsv3_jax.aot`), which compiles in a fresh process so the
  target's XLA flags and device count take effect, and `run_subprocess` for scripts and tests.
"""

from dsv3_jax.aot.compile import (Compiled, compile_decode, compile_prefill, compile_step,
                                  compile_train)
from dsv3_jax.aot.targets import Target, TargetError, parse_target
from dsv3_jax.aot.cli import main, run_subprocess

__all__ = ["Compiled", "Target", "TargetError", "compile_decode", "compile_prefill",
           "compile_step", "compile_train", "main", "parse_target", "run_subprocess"]
