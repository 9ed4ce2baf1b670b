#!/usr/bin/env python3
"""AOT-compile the real train / decode / prefill steps at cluster scale with the real compilers.

    python benchmarks/aot_scale.py                 # every case below, rewrites SCALE.md's table
    python benchmarks/aot_scale.py --only v3-train # cases whose name contains "v3-train"
    python benchmarks/aot_scale.py --replan        # no compiles: the saved compiler results
                                                   # against the current planner

Each case runs `python -m dsv3_jax.aot --target ...` in a fresh process: the TPU compiler
(libtpu, compile-only TPU v5p slices) or XLA:GPU's deviceless compilation for H100 / H200 hosts
(`pip install -e ".[aot]"`), under an address-space limit far below the model's size
(--max-memory-gb), so nothing can be materialised. The table between the markers in SCALE.md
is replaced; the text around it is written by hand. The compiler's results (memory analysis
and the HLO audit) are saved in benchmarks/aot_scale.json (one entry per case, replaced when
the case runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the planner here; the compiles run in subprocesses

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import device_line  # noqa: E402
from dsv3_jax import aot, plan, plan_cli  # noqa: E402
from dsv3_jax.aot.targets import Target  # noqa: E402

V2 = "configs/deepseek-v2-lite.json"
V3 = "configs/deepseek-v3-671b.json"
V3_TRAIN = ["--batch", "256", "--seq", "4096", "--capacity-factor", "1.25"]
V3_SERVE = ["--seq", "4096", "--serve"]
# (name, target, args, address-space limit in GB): V2-Lite is 31 GB in bf16, V3 1.3 TB; training
# in bf16 compute with fp32 master weights and bf16 first moments (train.py's defaults at scale)
CASES = [
    ("v2lite-train-v5p-64", "tpu-v5p:4x4x4", [V2, "expert=16,fsdp=4", "--batch", "64", "--seq", "4096"], 24),
    ("v2lite-train-h100-64", "h100:8x8", [V2, "expert=16,fsdp=4", "--batch", "64", "--seq", "4096"], 24),
    ("v3-train-h100-256", "h100:32x8", [V3, "expert=64,tensor=4", *V3_TRAIN, "--accumulate", "4"], 24),
    ("v3-train-h200-256", "h200:32x8", [V3, "expert=128,tensor=2", *V3_TRAIN, "--accumulate", "2"], 24),
    ("v3-train-v5p-256", "tpu-v5p:4x8x8", [V3, "expert=64,tensor=4", *V3_TRAIN, "--accumulate", "4"], 24),
    ("v3-decode-h100-32", "h100:4x8", [V3, "expert=32", "--batch", "128", *V3_SERVE], 24),
    ("v3-decode-h200-16", "h200:2x8", [V3, "expert=16", "--batch", "64", *V3_SERVE], 24),
    ("v3-decode-v5p-32", "tpu-v5p:2x4x4", [V3, "expert=32", "--batch", "128", *V3_SERVE], 24),
    ("v3-prefill-h200-16", "h200:2x8", [V3, "expert=16", "--batch", "64", *V3_SERVE,
                                        "--step", "prefill"], 24),
]
BEGIN, END = "<!-- aot_scale:begin -->", "<!-- aot_scale:end -->"
RESULTS = ROOT / "benchmarks" / "aot_scale.json"


def run_case(target: str, args: list[str], limit_gb: float) -> dict:
    config, mesh, *rest = args
    return aot.run_subprocess(["--config", config, "--mesh", mesh, "--target", target, *rest,
                               "--max-memory-gb", str(limit_gb)], timeout=3600)


def planner(args: list[str]) -> plan.Estimate | None:
    """The planner's estimate for a case, computed here (with the current formulas)."""
    ap = argparse.ArgumentParser()
    plan_cli.add_setup_args(ap)
    ap.add_argument("--step")
    config, mesh, *rest = args
    a = ap.parse_args(["--config", config, "--mesh", mesh, *rest])
    return None if a.step == "prefill" else plan.estimate(plan_cli.setup_from_args(a))


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f}"


def row(name: str, target: str, r: dict, est: plan.Estimate | None) -> str:
    name_, _, topology = target.partition(":")
    dev = plan.DEVICES[Target(name_, topology).planner_device]
    total = r["total"]
    p = f"{_gb(est.total)} | {est.total / total:.2f}" if est else "- | -"
    coll = r["audit"]["collectives"]
    sent = sum(c["bytes"] for c in coll.values())
    ragged = coll["ragged-all-to-all"]
    lg = r["audit"]["largest_all_gather"]
    return (f"| {name} | {r['kind']} | {r['mesh']} | {target} | {r['lower_s']:.0f} + {r['compile_s']:.0f} | "
            f"{_gb(r['argument'])} + {_gb(r['temp'])} = {_gb(total)} | {p} | "
            f"{'fits' if plan.fits(total, dev) else 'no'} | {_gb(sent)} | "
            f"{ragged['count']} ({ragged['asynchronous']} async) | {lg.get('bytes', 0) / 1e9:.2f} | "
            f"{r['peak_rss'] / 2**30:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--no-write", action="store_true", help="print only, leave SCALE.md")
    ap.add_argument("--replan", action="store_true",
                    help="compile nothing: the saved results against the current planner")
    args = ap.parse_args()
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    lines = ["| case | step | mesh | target | lower + compile s | compiler GB/device (args + temp = total) "
             "| planner GB/device | planner / compiler | fits the target (compiler) "
             "| collectives GB sent/device/step | ragged all-to-alls | largest all-gather GB "
             "| host RSS GiB |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, target, case_args, limit in CASES:
        t0 = time.perf_counter()
        if args.only in name and not args.replan:
            try:
                r = run_case(target, case_args, limit)
            except RuntimeError as e:
                print(f"{name}: FAILED\n{e}", file=sys.stderr)
                lines.append(f"| {name} | failed: {str(e).splitlines()[-1][:80]} |")
                continue
            r["measured"] = f"{time.strftime('%Y-%m-%d')} on {device_line()}"
            saved[name] = {k: v for k, v in r.items() if k != "planner"}
            RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
            print(f"{name}: {time.perf_counter() - t0:.0f} s; {r['setup']}", flush=True)
        if name in saved:  # every case with a result, run now or before
            lines.append(row(name, target, saved[name], planner(case_args)))
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return 0
    path = ROOT / "SCALE.md"
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    when = sorted({saved[n]["measured"] for n, _, _, _ in CASES if n in saved})
    stamp = f"Compiled {'; '.join(when)}.\n\n"
    path.write_text(f"{head}{BEGIN}\n{stamp}{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
