"""An audit of a compiled step's optimized HLO: what it communicates and how it multiplies.

`audit(hlo_text, cost)` reads the text XLA prints for a compiled executable
(`compiled.as_text()`, the same on XLA:CPU, XLA:GPU and the TPU compiler) and returns a plain
dict (kept in `python -m dsv3_jax.aot --json`):

- `collectives`: per kind (all-to-all, ragged-all-to-all, all-gather, reduce-scatter,
  all-reduce, collective-permute): how many run per step, how many of those are asynchronous
  (`*-start`/`*-done` pairs, or wrapped in `async-start` / a `fusion-start`, and not marked
  `is_sync`), and the bytes one device sends per step. Bytes are from the operands one device
  holds (b) and the group size (n): all-gather b (n-1); reduce-scatter and all-to-all
  b (n-1)/n; all-reduce 2 b (n-1)/n (ring); collective-permute b; ragged-all-to-all its input
  buffer's b (n-1)/n, an upper bound (how many rows really travel is known at run time only).
- `largest_all_gather`: the biggest single all-gather (its result bytes and shape, and the
  JAX op that asked for it): a whole weight gathered every decode step shows up here.
- `matmuls`: per operand dtypes ("bf16 x bf16", "f8e4m3fn x f8e4m3fn", ...), the dots,
  convolutions (the TPU compiler's form of a dot), ragged dots and cuBLAS GEMM calls run per
  step, and their FLOPs where the HLO gives them (dots and GEMM calls; the TPU's convolutions
  are counted but their FLOPs are left to the compiler's own cost analysis).
- `grouped_gemms`: the routed experts' grouped GEMMs (dsv3_jax/layers/platform_gmm.py): native
  kernels per step (XLA's `ragged-dot` op, or a TPU / Mosaic GPU custom call made for a ragged
  dot or a megablox `gmm`/`tgmm`), split by JAX's op names into forward, recomputed (remat's
  `rematted_computation`) and backward (`transpose(`; a kernel the compiler re-made without
  JAX's metadata is judged by its users), `wgrad` the backward ones with a ragged contraction
  (one [K, N] output per group; the others are dgrad); and
  `dense`: plain matmuls carrying a ragged dot's op name, i.e. the compiler expanded a ragged dot
  into a dense [groups, rows, K] product (XLA:GPU does), with their FLOPs.
- `flops`: the step's FLOPs from the HLO, every instruction times how often it runs: `matmuls`
  (the dots and convolutions above), `kernels` (other custom-call kernels by the cost estimate
  the TPU compiler prints with them, e.g. splash attention), `grouped` (the grouped GEMMs at
  their buffer rows: an upper bound, their kernels visit only the routed rows' tiles) and
  `grouped_per_row` (their FLOPs per routed row, to count them at the rows really routed:
  `step_flops`), with the parts rematerialisation recomputes (`recomputed`,
  `recomputed_per_row`). The compiler's own cost analysis counts each instruction once
  (a loop body once), so for scanned layers it is no step count.
- `cost`: the backend's cost analysis (FLOPs, bytes accessed, optimal seconds) where it
  reports one (the TPU compiler and XLA:CPU; XLA:GPU's deviceless compile does not).

"Per step" counts every instruction once per execution: a while loop's body counts its trip
count times (XLA's `known_trip_count`, else the `i < N` of its condition; loops it cannot
bound count once and are reported in `unbounded_loops`); both branches of a conditional count.
"""

from __future__ import annotations

import math
import re

from dsv3_jax.aot.hlo import (Instruction, arrays, attr, is_sync, multiplicities, nbytes,
                              op_name, parse, source_locations)

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_GEMM_TARGETS = ("gemm", "matmul")
# custom calls that may be a grouped GEMM kernel, and the op names that say they are one
_KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu")
_GROUPED_NAME = re.compile(r"ragged[-_]dot|ragged_contracting|(^|/)t?gmm(/|$)")
TOP = 6  # collectives listed by source line


def _group_size(inst: Instruction) -> int | None:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", inst.attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", inst.attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", inst.attrs)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return None


def _sent(kind: str, b: int, n: int | None) -> float:
    if n is None or n <= 1:
        return 0.0 if n == 1 else float(b)
    return {"all-gather": b * (n - 1), "reduce-scatter": b * (n - 1) / n,
            "all-to-all": b * (n - 1) / n, "ragged-all-to-all": b * (n - 1) / n,
            "all-reduce": 2 * b * (n - 1) / n, "collective-permute": b}[kind]


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _matmul(inst: Instruction, types: dict[str, str]) -> tuple[str, float | None] | None:
    """(operand dtypes, FLOPs or None) when `inst` is a matrix multiplication."""
    op = inst.opcode
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
        if not target or not any(t in target.group(1).lower() for t in _GEMM_TARGETS):
            return None
    elif op not in ("dot", "convolution", "ragged-dot"):
        return None
    ops = [arrays(types.get(o, "")) for o in inst.operands[:2]]
    if len(ops) < 2 or not ops[0] or not ops[1]:
        return None
    (ld, ls), (rd, _) = ops[0][0], ops[1][0]
    key = f"{ld} x {rd}"
    out = arrays(inst.type)
    if not out:
        return key, None
    if op == "convolution":
        return key, _conv_flops(inst.attrs, ls, ops[1][0][1], out[0][1])
    if op == "custom-call":
        cfg = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
        contracting = [int(x) for x in re.findall(r"\d+", cfg.group(1))] if cfg else []
    else:
        contracting = _dims(inst.attrs, "lhs_contracting_dims")
    k = math.prod(ls[i] for i in contracting if i < len(ls))
    return key, 2.0 * math.prod(out[0][1]) * k


def _grouped_gemm(inst: Instruction) -> bool:
    """Whether `inst` is a native grouped GEMM kernel (see the module docstring)."""
    if inst.opcode == "ragged-dot":
        return True
    if inst.opcode != "custom-call":
        return False
    target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
    out = arrays(inst.type)
    return bool(target and target.group(1).startswith(_KERNEL_TARGETS)
                and _GROUPED_NAME.search(op_name(inst) or inst.name)
                and out and out[0][0].startswith(("f", "bf")) and len(out[0][1]) >= 2)


def _kernel_flops(inst: Instruction) -> float | None:
    """The FLOPs a custom-call kernel's cost estimate states (the TPU compiler prints one)."""
    m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', inst.attrs)
    return float(m.group(1)) if m else None


def _grouped_flops_per_row(inst: Instruction, types: dict[str, str]) -> float:
    """2 x K x N of a grouped GEMM kernel: ragged rows [M, N] out of [M, K] x [G, K, N] (the
    weight's other dim is K), or a ragged contraction [G, K, N] out of [M, K] x [M, N]."""
    out = arrays(inst.type)[0][1]
    ops = [a[0][1] for a in (arrays(types.get(o, "")) for o in inst.operands)
           if a and a[0][0].startswith(("f", "bf"))]
    if len(out) == 3:
        return 2.0 * out[1] * out[2]
    w = next((o for o in ops if len(o) == 3), None)
    k = 0 if w is None else (w[1] if w[2] == out[1] else w[2])
    return 2.0 * out[1] * k


def _direction(inst: Instruction, users: dict[str, list[Instruction]]) -> str:
    """"forward", "recomputed" (rematerialised in the backward pass) or "backward", from JAX's
    op name or, where the compiler dropped it, from the nearest users that have one (through
    copies and bitcasts); "unattributed" when none says."""
    frontier, seen = [inst], set()
    for _ in range(4):
        names = [n for n in map(op_name, frontier) if n.startswith("jit(")]
        if any("rematted_computation" in n for n in names):
            return "recomputed"
        if names:
            return "backward" if any("transpose(" in n for n in names) else "forward"
        seen.update(i.name for i in frontier)
        frontier = [u for i in frontier for u in users.get(i.name, []) if u.name not in seen]
    return "unattributed"


def _conv_flops(attrs: str, lhs, rhs, out) -> float | None:
    """FLOPs of a convolution, the TPU compiler's form of a dot (batch dims become windows with
    lhs dilation): 2 x output elements x the kernel's input features x the window taps that
    land on real (not dilated or padded) input, per output position."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not m:
        return None
    lhs_l, rhs_l, out_l = m.groups()
    spatial = sorted(c for c in out_l if c.isdigit())
    w = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=(\S+)", w.group(1))) if w else {}

    def per_dim(name, default):
        v = fields.get(name)
        return [default] * len(spatial) if v is None else v.split("x")

    size, stride = per_dim("size", "1"), per_dim("stride", "1")
    pad, lhs_dil, rhs_dil = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for i, d in enumerate(spatial):
        n_in, n_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
        lo = int(pad[i].split("_")[0])
        k, st, ld, rd = int(size[i]), int(stride[i]), int(lhs_dil[i]), int(rhs_dil[i])
        taps *= sum(1 for o in range(n_out) for t in range(k)
                    if (p := o * st + t * rd - lo) >= 0 and p % ld == 0 and p // ld < n_in)
    others = math.prod(n for c, n in zip(out_l, out) if not c.isdigit())
    return 2.0 * others * taps * rhs[rhs_l.index("i")]


def audit(hlo_text: str, cost: dict | None = None) -> dict:
    """The audit of one compiled step (see the module docstring)."""
    comps, entry = parse(hlo_text)
    mult, asynchronous, unknown = multiplicities(comps, entry)
    coll = {k: dict(count=0, asynchronous=0, bytes=0.0) for k in COLLECTIVES}
    sources = source_locations(hlo_text)
    by_source: dict[tuple[str, str], dict] = {}
    matmuls: dict[str, dict] = {}
    largest = dict(bytes=0, shape="", op_name="")
    grouped = dict(forward=0, recomputed=0, backward=0, unattributed=0, wgrad=0, dense=0,
                   dense_flops=0.0)
    flops = dict(matmuls=0.0, kernels=0.0, grouped=0.0, grouped_per_row=0.0, recomputed=0.0,
                 recomputed_per_row=0.0)
    for name, insts in comps.items():
        m = mult.get(name, 0)
        if not m:
            continue
        types = {i.name: i.type for i in insts}
        users = None
        for inst in insts:
            if _grouped_gemm(inst):
                if users is None:
                    users = {}
                    for i in insts:
                        for o in i.operands:
                            users.setdefault(o, []).append(i)
                direction = _direction(inst, users)
                grouped[direction] += m
                grouped["wgrad"] += m if len(arrays(inst.type)[0][1]) == 3 else 0
                per_row = _grouped_flops_per_row(inst, types)
                rows = arrays(inst.type)[0][1][0] if len(arrays(inst.type)[0][1]) == 2 else (
                    next((a[0][1][0] for a in (arrays(types.get(o, "")) for o in inst.operands)
                          if a and len(a[0][1]) == 2 and a[0][0].startswith(("f", "bf"))), 0))
                flops["grouped"] += m * per_row * rows
                flops["grouped_per_row"] += m * per_row
                flops["recomputed_per_row"] += m * per_row if direction == "recomputed" else 0
                continue
            recomputed = "rematted_computation" in op_name(inst)
            if inst.opcode == "custom-call" and (kf := _kernel_flops(inst)) is not None:
                flops["kernels"] += m * kf
                flops["recomputed"] += m * kf if recomputed else 0
            op = inst.opcode
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES and not op.endswith("-done"):
                operands = inst.operands[:1] if base == "ragged-all-to-all" else inst.operands
                b = sum(nbytes(types.get(o, "")) for o in operands)
                n = _group_size(inst)
                c = coll[base]
                c["count"] += m
                is_async = (op.endswith("-start") or name in asynchronous) and not is_sync(inst)
                c["asynchronous"] += m if is_async else 0
                c["bytes"] += m * _sent(base, b, n)
                where = sources.get(attr(inst, "stack_frame_id"), "") or op_name(inst)[-60:]
                src = by_source.setdefault((base, where), dict(kind=base, where=where, count=0,
                                                                bytes=0.0, group=n))
                src["count"] += m
                src["bytes"] += m * _sent(base, b, n)
                if base == "all-gather" and b * (n or 1) > largest["bytes"]:
                    shapes = [f"{d}[{','.join(map(str, s))}]" for o in operands
                              for d, s in arrays(types.get(o, ""))]
                    more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
                    largest = dict(bytes=b * (n or 1), shape=" ".join(shapes[:3]) + more,
                                   group=n, op_name=op_name(inst),
                                   where=sources.get(attr(inst, "stack_frame_id"), ""))
                continue
            mm = _matmul(inst, types)
            if mm:
                key, fl = mm
                row = matmuls.setdefault(key, dict(count=0, flops=0.0, without_flops=0))
                row["count"] += m
                if fl is None:
                    row["without_flops"] += m
                else:
                    row["flops"] += m * fl
                    flops["matmuls"] += m * fl
                    flops["recomputed"] += m * fl if recomputed else 0
                if _GROUPED_NAME.search(op_name(inst)):  # a ragged dot expanded to a dense one
                    grouped["dense"] += m
                    grouped["dense_flops"] += m * (fl or 0.0)
    for c in coll.values():
        c["bytes"] = int(c["bytes"])
    top = sorted(by_source.values(), key=lambda r: -r["bytes"])[:TOP]
    for r in top:
        r["bytes"] = int(r["bytes"])
    return dict(collectives=coll, largest_all_gather=largest, matmuls=matmuls,
                grouped_gemms=grouped, flops=flops, cost=_cost(cost), unbounded_loops=unknown,
                top_collectives=top)


def _cost(cost) -> dict | None:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return {k: float(cost[src]) for k, src in (("flops", "flops"), ("bytes_accessed", "bytes accessed"),
                                                ("optimal_seconds", "optimal_seconds"))
            if src in cost}


def matmul_flops(a: dict) -> float | None:
    """FLOPs of the step's matmuls from the HLO, or None when some have no FLOP count."""
    rows = a["matmuls"].values()
    if any(r["without_flops"] for r in rows):
        return None
    return sum(r["flops"] for r in rows)


def step_flops(a: dict, routed_rows: float | None = None) -> tuple[float, float]:
    """(FLOPs per device per step, of which remat recomputes) from the HLO (`flops` above), the
    grouped GEMMs counted at `routed_rows` rows each (rows one device's experts receive per
    MoE layer; None: at their buffer rows, an upper bound)."""
    f = a["flops"]
    if routed_rows is None:
        grouped = f["grouped"]
        recomputed = f["recomputed"] + (f["grouped"] * f["recomputed_per_row"]
                                        / f["grouped_per_row"] if f["grouped_per_row"] else 0.0)
    else:
        grouped = f["grouped_per_row"] * routed_rows
        recomputed = f["recomputed"] + f["recomputed_per_row"] * routed_rows
    return f["matmuls"] + f["kernels"] + grouped, recomputed


def table(a: dict, planner_flops: float | None = None, routed_rows: float | None = None) -> str:
    """The audit as text: collectives, the largest all-gather, matmuls, grouped GEMMs, FLOPs
    (the grouped GEMMs at `routed_rows` rows per device and MoE layer when given)."""
    lines = ["collective            per step  async     bytes sent / device (the largest by source below)"]
    for kind, c in a["collectives"].items():
        if c["count"]:
            bound = "<=" if kind == "ragged-all-to-all" else "  "  # its buffers' capacity
            lines.append(f"  {kind:<20} {c['count']:>7,}  {c['asynchronous']:>5,}  "
                         f"{bound}{c['bytes'] / 1e9:>10.3f} GB")
    for r in a.get("top_collectives", []):
        if r["bytes"]:
            lines.append(f"    {r['bytes'] / 1e9:>10.3f} GB  {r['kind']:<18} x{r['count']:<6,} "
                         f"group {r['group']}  {r['where']}")
    lg = a["largest_all_gather"]
    if lg.get("bytes"):
        lines.append(f"largest all-gather: {lg['bytes'] / 1e9:.3f} GB ({lg['shape']} x {lg['group']}) "
                     f"at {lg.get('where') or '?'}: {lg['op_name'][-80:]}")
    lines.append("matmuls (operand dtypes)   per step    GFLOP (from the HLO)")
    for key, r in sorted(a["matmuls"].items(), key=lambda kv: -kv[1]["count"]):
        if r["without_flops"] == r["count"]:
            fl = "(convolutions: in the compiler's FLOPs)"
        else:
            fl = f"{r['flops'] / 1e9:,.1f}" + (f" (+{r['without_flops']:,} convolutions)"
                                                if r["without_flops"] else "")
        lines.append(f"  {key:<24} {r['count']:>9,}    {fl}")
    g = a.get("grouped_gemms")
    if g:
        dense = (f"DENSE EXPANSION: {g['dense']:,} matmuls from ragged dots "
                 f"({g['dense_flops'] / 1e9:,.1f} GFLOP)" if g["dense"] else "no dense expansion")
        more = f", {g['unattributed']:,} unattributed" if g["unattributed"] else ""
        remat = f" (+{g['recomputed']:,} recomputed by remat)" if g["recomputed"] else ""
        lines.append(f"routed experts' grouped GEMMs per step (native kernels): forward "
                     f"{g['forward']:,}{remat}, backward {g['backward']:,} (dgrad "
                     f"{g['backward'] - g['wgrad']:,}, wgrad {g['wgrad']:,}){more}; " + dense)
    cost = a.get("cost") or {}
    mf = matmul_flops(a)
    flops = [("compiler", cost.get("flops")), ("HLO matmuls", mf), ("planner", planner_flops)]
    lines.append("FLOPs per device per step: " + ", ".join(
        f"{k} {v:.3e}" for k, v in flops if v is not None)
        + (" (the compiler's count takes each instruction once: a loop body once)"
           if cost.get("flops") else ""))
    if a.get("flops") and (a["flops"]["kernels"] or a["flops"]["grouped"]):
        total, recomputed = step_flops(a, routed_rows)
        where = (f"the grouped GEMMs at {routed_rows:,.0f} routed rows per MoE layer"
                 if routed_rows is not None else "the grouped GEMMs at their buffer rows")
        vs = (f"; without the recomputation {(total - recomputed) / planner_flops:.2f} x the "
              "planner's" if planner_flops else "")
        lines.append(f"  with trip counts, kernels' own estimates and {where}: {total:.3e}, "
                     f"of which remat recomputes {recomputed:.3e}{vs}")
    if cost.get("bytes_accessed"):
        lines.append(f"bytes accessed per device: {cost['bytes_accessed'] / 1e9:.2f} GB; "
                     f"compiler's optimal time {cost.get('optimal_seconds', 0):.4f} s")
    if a.get("unbounded_loops"):
        lines.append(f"note: {a['unbounded_loops']} loops of unknown trip count counted once")
    return "\n".join(lines)

