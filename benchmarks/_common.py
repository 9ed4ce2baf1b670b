"""Shared helpers for the benchmark scripts: device description, tables, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
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
