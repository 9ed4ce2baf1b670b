#!/usr/bin/env python3
"""AOT-compile the real train / decode steps at cluster scale and compare with the planner.

    python benchmarks/aot_scale.py                 # every case below, rewrites SCALE.md's table
    python benchmarks/aot_scale.py --only v2lite   # cases whose name contains "v2lite"
    python benchmarks/aot_scale.py --replan        # no compiles: the saved compiler results
                                                   # against the current planner


Each case runs `python -m dsv3_jax.aot` in a fresh process with the mesh's number of fake CPU
devices and an address-space limit far below the model's size (--max-memory-gb), so nothing
can be materialised. The table between the markers in SCALE.md is replaced; the text around it
is written by hand. The compiler's results are saved in benchmarks/aot_scale.json (one entry
per case, replaced when the case runs again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import device_line  # noqa: E402
from dsv3_jax import aot, plan, plan_cli  # noqa: E402

V2 = "configs/deepseek-v2-lite.json"
V3 = "configs/deepseek-v3-671b.json"
# (name, args, address-space limit in GB): V2-Lite is 31 GB in bf16, V3 1.3 TB
CASES = [
    ("v2lite-train-64", [V2, "pipeline=2,expert=32", "--batch", "64", "--seq", "256",
                         "--precision", "fp32"], 10),
    ("v2lite-train-64-p4", [V2, "pipeline=4,expert=16", "--batch", "64", "--seq", "256",
                            "--precision", "fp32"], 10),
    ("v3-train-256-p2-cf", [V3, "pipeline=2,expert=128", "--batch", "256", "--seq", "4096",
                            "--precision", "fp32", "--capacity-factor", "1.25"], 16),
    ("v3-train-256-p8-cf", [V3, "pipeline=8,expert=32", "--batch", "256", "--seq", "4096",
                            "--precision", "fp32", "--capacity-factor", "1.25"], 16),
    ("v3-train-256-p2-dropless", [V3, "pipeline=2,expert=128", "--batch", "256", "--seq", "1024",
                                  "--precision", "fp32"], 16),
    ("v3-decode-16", [V3, "expert=16", "--batch", "64", "--seq", "4096", "--serve"], 16),
    ("v3-decode-32", [V3, "expert=32", "--batch", "128", "--seq", "4096", "--serve"], 16),
]
BEGIN, END = "<!-- aot_scale:begin -->", "<!-- aot_scale:end -->"
RESULTS = ROOT / "benchmarks" / "aot_scale.json"


def run_case(args: list[str], limit_gb: float) -> dict:
    config, mesh, *rest = args
    return aot.run_subprocess(["--config", config, "--mesh", mesh, *rest,
                               "--max-memory-gb", str(limit_gb)], timeout=3600)


def planner(args: list[str]) -> plan.Estimate:
    """The planner's estimate for a case, computed here (with the current formulas)."""
    ap = argparse.ArgumentParser()
    plan_cli.add_setup_args(ap)
    config, mesh, *rest = args
    return plan.estimate(plan_cli.setup_from_args(ap.parse_args(["--config", config, "--mesh", mesh,
                                                             *rest])))


def row(name: str, r: dict, est: plan.Estimate) -> str:
    p = est.as_dict()
    ratio = p["total"] / r["total"]
    fits = lambda b, dev: "fits" if plan.fits(b, plan.DEVICES[dev]) else "no"  # noqa: E731
    return (f"| {name} | {r['kind']} | {r['mesh']} | {r['lower_s']:.0f} + {r['compile_s']:.0f} | "
            f"{r['argument'] / 1e9:.1f} + {r['temp'] / 1e9:.1f} = {r['total'] / 1e9:.1f} | "
            f"{p['total'] / 1e9:.1f} | {ratio:.2f} | {fits(r['total'], 'h100-80g')} / "
            f"{fits(r['total'], 'h200')} | {r['peak_rss'] / 2**30:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--no-write", action="store_true", help="print only, leave SCALE.md")
    ap.add_argument("--replan", action="store_true",
                    help="compile nothing: the saved results against the current planner")
    args = ap.parse_args()
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    lines = ["| case | step | mesh | lower + compile s | compiler GB/device (args + temp = total) "
             "| planner GB/device | planner / compiler | 80 GB / 141 GB (compiler) | host RSS GiB |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for name, case_args, limit in CASES:
        t0 = time.perf_counter()
        if args.only in name and not args.replan:
            try:
                r = run_case(case_args, limit)
            except RuntimeError as e:
                print(f"{name}: FAILED\n{e}", file=sys.stderr)
                lines.append(f"| {name} | failed: {str(e).splitlines()[-1][:80]} |")
                continue
            r["measured"] = f"{time.strftime('%Y-%m-%d')} on {device_line()}"
            saved[name] = {k: v for k, v in r.items() if k != "planner"}
            RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
            print(f"{name}: {time.perf_counter() - t0:.0f} s; {r['setup']}", flush=True)
        if name in saved:  # every case with a result, run now or before
            lines.append(row(name, saved[name], planner(case_args)))
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return 0
    path = ROOT / "SCALE.md"
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    when = sorted({saved[n]["measured"] for n, _, _ in CASES if n in saved})
    stamp = f"Measured {'; '.join(when)}.\n\n"
    path.write_text(f"{head}{BEGIN}\n{stamp}{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
