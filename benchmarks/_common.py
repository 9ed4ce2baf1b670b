"""Shared helpers for the benchmark scripts: device description, tables, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"

HEADER = """# dsv3-jax benchmarks

Measured numbers, newest section last. To add rows, run a script under `benchmarks/`
(e.g. `python benchmarks/compile_time.py`): it prints its table and appends a dated section here,
naming the device, the versions and the command that reproduces it. Ratios within a section are
measured side by side in one run; compare numbers across sections only on the same device.
"""


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_line() -> str:
    """`CPU <model>, N cores; python X, jax Y, jaxlib Z, flax W`, led by the accelerator
    (`NVIDIA H100 80GB HBM3 x 8 (gpu, compute capability 9.0); host CPU ...`) when JAX has one."""
    import flax
    import jax
    import jaxlib

    dev = jax.devices()[0]
    accelerator = ""
    if dev.platform != "cpu":
        cc = getattr(dev, "compute_capability", None)
        accelerator = (f"{dev.device_kind} x {jax.device_count()} ({dev.platform}"
                       f"{f', compute capability {cc}' if cc else ''}); host ")
    return (f"{accelerator}CPU {cpu_model()}, {usable_cores()} cores; python "
            f"{platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
            f"flax {flax.__version__}")


def command_line() -> str:
    """The command that reproduces this run, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def median(xs):
    return statistics.median(xs)


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(headers), sep, *(fmt(r) for r in cells)])


def append_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Append `## <date> <title>` with device, command and `body` to BENCHMARKS.md."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"\n## {stamp} {title}\n\n"
            f"- Device: {device_line()}\n"
            f"- Command: `{command_line()}`\n\n"
            f"{body.rstrip()}\n")
    if not path.exists() or not path.read_text().strip():
        path.write_text(HEADER)
    with path.open("a") as fh:
        fh.write(text)
    print(f"appended to {os.path.relpath(path)}")


def timed(fn, iters: int) -> list[float]:
    """Seconds of `iters` calls of `fn` after one untimed warm-up call (the compile)."""
    fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def side_by_side(impl: str, worker: str, transformers_script: Path, transformers_python: str,
                 common: list[str], threads: int, omp_wait_policy: str = "PASSIVE") -> dict:
    """One fresh process of `impl`: "ours" (`worker --worker ...`, this Python) or the PyTorch
    side (`transformers_script` under `transformers_python`), with the same arguments and thread
    rules: XLA's single-thread flag for 1 thread, OMP_WAIT_POLICY for both ('' = unset), pinned
    below all cores (`run_worker`). Returns its JSON line."""
    env = dict(os.environ)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    if impl == "ours":
        cmd = [sys.executable, worker, "--worker", *common]
        if threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    else:
        cmd = [transformers_python, str(transformers_script), *common]
    return run_worker(cmd, threads, env, impl)


def run_worker(cmd: list[str], threads: int, env: dict | None = None, name: str = "worker") -> dict:
    """Run a benchmark worker in a fresh process and return the JSON line it prints last.

    With fewer `threads` than usable cores the process is pinned to the first `threads` cores
    (sched_setaffinity), so its runtime cannot use more whatever it does."""
    cores = sorted(os.sched_getaffinity(0))
    pin = set(cores[:threads]) if threads < len(cores) else None
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} run failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
