"""The planner's command line (`python -m dsv3_jax.plan`) and its mesh search.

One layout (`--mesh`): the per-device table of dsv3_jax/plan.py and a fits / does-not-fit
verdict. A device count alone (`--devices N`): every mesh the model's shapes allow
(`candidate_meshes`), estimated, the ones that fit listed best first (`search`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsv3_jax.config import ModelConfig
from dsv3_jax.plan import (DEVICES, DTYPES, HEADROOM, Device, Estimate, Setup, check_batch,
                           estimate, make_setup)
from sharding.mesh import MeshError


# ------------------------------------------------------------------------------- mesh search
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(cfg: ModelConfig, devices: int, *, serve: bool) -> list[str]:
    """Meshes over `devices` that the model's shapes allow (at most one pipeline stage per MoE
    layer when training; expert divides the experts; tensor divides the heads; the rest on
    fsdp). A pipeline that does not divide the MoE layers runs the rest before it
    (sharding/pipeline.py) and pays for resharding its stages (the planner's stage_copies)."""
    out = []
    for P in ([1] if serve else _divisors(devices)):
        if P > cfg.num_moe_layers:
            continue
        for X in _divisors(devices // P):
            if cfg.n_routed_experts % X:
                continue
            for T in (1, 2, 4, 8):
                rest = devices // (P * X)
                if rest % T or cfg.num_attention_heads % T:
                    continue
                F = rest // T
                spec = f"pipeline={P},fsdp={F},expert={X},tensor={T}"
                out.append(spec)
    return out


def search(config, devices: int, device: Device, **kw) -> list[tuple[Setup, Estimate]]:
    """The meshes that fit, best first: smallest pipeline bubble, then smallest tensor axis
    (tensor parallelism all-reduces activations in every layer), then most free memory."""
    rows = []
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_json(config)
    for spec in candidate_meshes(cfg, devices, serve=kw.get("serve", False)):
        try:
            setup = make_setup(config, spec, devices, **kw)
            est = estimate(setup)
            check_batch(setup)
        except (MeshError, ValueError):
            continue
        if est.fits(device):
            rows.append((setup, est))
    bubble = lambda st: (st.stages - 1) / (st.microbatches + st.stages - 1)  # noqa: E731
    rows.sort(key=lambda r: (bubble(r[0]), r[0].sizes["tensor"], r[1].total))
    return rows


# ------------------------------------------------------------------------------- CLI
def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def report(setup: Setup, est: Estimate, devices: list[Device]) -> str:
    """The table and verdict for one layout."""
    lines = [setup.describe(), f"{setup.devices} devices; per device:"]
    width = max(len(k) for k in est.parts)
    for k, v in est.parts.items():
        lines.append(f"  {k:<{width}}  {gb(v):>12}")
    lines.append(f"  {'total':<{width}}  {gb(est.total):>12}")
    lines += [f"  note: {n}" for n in est.notes]
    what = "generated token" if setup.serve else "token (fwd+bwd)"
    lines.append(f"FLOPs per {what}: {est.flops_per_token:.3e}; per step: {est.flops_per_step:.3e}")
    for dev in devices:
        verdict = "FITS" if est.fits(dev) else "DOES NOT FIT"
        lines.append(f"{dev.name} ({gb(dev.memory)}, {1 - HEADROOM:.0%} usable): {verdict}"
                     + (f"; at most {est.capacity_slots[_key(dev)]:,} slots of {setup.seq} "
                        "tokens" if setup.serve else
                        f"; ideal step {est.flops_per_step / (setup.devices * dev.peak_flops):.2f} s"
                        " at 100% MFU"))
    return "\n".join(lines)


def _key(dev: Device) -> str:
    return next(k for k, v in DEVICES.items() if v is dev)


def comparison_table(rows) -> str:
    """Markdown rows: setup, compile time, compiler bytes, planner bytes, ratio."""
    out = ["| step | mesh | compile s | compiler GB/device | planner GB/device | planner / compiler |",
           "|---|---|---:|---:|---:|---:|"]
    for setup, compiled, est in rows:
        out.append(f"| {compiled.kind} | {setup.mesh_spec} | {compiled.compile_s:.0f} | "
                   f"{compiled.total / 1e9:.2f} | {est.total / 1e9:.2f} | "
                   f"{est.total / compiled.total:.3f} |")
    return "\n".join(out)


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="model config JSON (HF field names)")
    ap.add_argument("--mesh", default="", help='e.g. "pipeline=8,expert=32" (absent axes: 1)')
    ap.add_argument("--devices", type=int, default=None, help="device count (default: the mesh's)")
    ap.add_argument("--batch", type=int, required=True, help="sequences per step / serving slots")
    ap.add_argument("--seq", type=int, required=True, help="sequence length / serving context")
    ap.add_argument("--serve", action="store_true", help="plan the decode step, not training")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=0, help="pipeline micro-batches (0: P)")
    ap.add_argument("--pipeline-schedule", default="gpipe",
                    choices=("gpipe", "1f1b", "zb", "dualpipev"),
                    help="pipeline schedule (sharding/schedules.py)")
    ap.add_argument("--param-dtype", choices=DTYPES, default=None,
                    help="stored parameters (default fp32 master weights; bf16 serving)")
    ap.add_argument("--moments-dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="bf16")
    ap.add_argument("--no-remat", dest="remat", action="store_false")
    ap.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    ap.add_argument("--no-mtp", dest="mtp", action="store_false")


def setup_from_args(args, mesh: str | None = None) -> Setup:
    return make_setup(args.config, mesh if mesh is not None else args.mesh, args.devices,
                      batch=args.batch, seq=args.seq, serve=args.serve,
                      accumulate=args.accumulate, microbatches_arg=args.microbatches,
                      pipeline_schedule=args.pipeline_schedule,
                      param_dtype=args.param_dtype or ("bf16" if args.serve else "fp32"),
                      moments_dtype=args.moments_dtype, precision=args.precision,
                      remat=args.remat, capacity_factor=args.capacity_factor, mtp=args.mtp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_args(ap)
    ap.add_argument("--device", default="h100-80g", choices=sorted(DEVICES))
    ap.add_argument("--top", type=int, default=8, help="meshes listed without --mesh")
    args = ap.parse_args(argv)
    device = DEVICES[args.device]
    try:
        if args.mesh:
            setup = setup_from_args(args)
            check_batch(setup)
            print(report(setup, estimate(setup), [device]))
            return 0
        if not args.devices:
            ap.error("give --mesh, or --devices N to search the meshes that fit")
        probe = setup_from_args(args, mesh=f"fsdp={args.devices}")
        found = search(args.config, args.devices, device, **{
            f.name: getattr(probe, f.name) for f in dataclasses.fields(Setup)
            if f.name not in ("config", "mesh", "config_path")})
    except (MeshError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not found:
        print(f"no mesh of {args.devices} x {device.name} fits this setup")
        return 1
    print(f"{len(found)} meshes of {args.devices} x {device.name} fit; best first:")
    for setup, est in found[:args.top]:
        print(f"  {setup.mesh_spec:<40} {gb(est.total):>12} per device")
    print()
    print(report(*found[0], [device]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
