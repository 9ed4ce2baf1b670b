"""Does dualpipev's F&B pair overlap one chunk's collectives with the other chunk's matmuls?

Read from a compiled step's optimized HLO (`python -m dsv3_jax.aot ... --pipeline-schedule
dualpipev --hlo FILE`, or `compiled.as_text()`). The executor runs a pair as one layer loop
(`LayerStack.forward_backward` in sharding/stage_calculus.py): iteration l is the forward of
layer l of one chunk and the backward of layer n - 1 - l of the other. Its loop body (or the
switch branch a one-iteration loop was inlined into) is the computation holding matmuls of both
halves that jax named inside a pair branch's loop; an instruction belongs to the backward half
when jax named it inside a transpose (`transpose(...)` in its op_name: the backward, including
the forward it recomputes under remat), else to the forward half. For each collective of the
body (all-to-all, ragged-all-to-all, collective-permute, all-gather, all-reduce,
reduce-scatter): is it asynchronous (a -start / -done pair, or an async-start wrapping it), and
are matmuls (dots, convolutions, GEMM or ragged-dot custom calls, fusions or loops containing
them) of the other half scheduled between its start and done. A synchronous collective overlaps
nothing on the compute stream.
"""

from __future__ import annotations

import re

from dsv3_jax.aot.hlo import Instruction, _called, is_sync, op_name, parse

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "collective-permute", "all-gather",
               "all-reduce", "reduce-scatter")


def _half(inst: Instruction, comps) -> str:
    """"B" for an instruction jax named inside a transpose (a fusion: its fused root's name)."""
    name = op_name(inst)
    if not name:
        for _, callee in _called(inst):
            names = [op_name(i) for i in comps.get(callee, []) if op_name(i)]
            if names:
                name = names[-1]
                break
    return "B" if "transpose(" in name else "F"


def _has_matmul(name: str, comps, seen=None) -> bool:
    seen = seen if seen is not None else set()
    if name in seen:
        return False
    seen.add(name)
    return any(_is_matmul(i, comps, seen) for i in comps.get(name, []))


def _is_matmul(inst: Instruction, comps, seen=None) -> bool:
    if inst.opcode in ("dot", "convolution", "ragged-dot"):
        return True
    if inst.opcode == "custom-call" and re.search(r"gemm|matmul|dot", inst.attrs, re.I):
        return True
    if inst.opcode == "conditional":  # a branch is a place of its own
        return False
    return any(_has_matmul(callee, comps, seen) for key, callee in _called(inst)
               if key != "condition")


def _collective(inst: Instruction, comps) -> tuple[str, bool] | None:
    """(kind, asynchronous) of a collective instruction (its start, when split), else None."""
    op = inst.opcode
    if op in COLLECTIVES:
        return op, False
    if op.endswith("-start") and op[:-6] in COLLECTIVES:
        return op[:-6], not is_sync(inst)
    if op == "async-start":
        for _, callee in _called(inst):
            for i in comps.get(callee, []):
                if i.opcode in COLLECTIVES:
                    return i.opcode, True
    return None


def pair_overlap(hlo_text: str, branches) -> dict:
    """{"bodies": n, "collectives": {kind: {"count", "async", "with_other_half",
    "with_any_matmul"}}} over the layer loops of the tick switch's `branches` (the indices of
    the F&B pairs in sharding/schedule_program.py's branch list), as jax names them
    (`cond/branch_K_fun/while/body/` in the op_name)."""
    comps, _ = parse(hlo_text)
    marks = tuple(f"cond/branch_{k}_fun/while/body/" for k in branches)

    def in_pair(inst) -> bool:
        name = op_name(inst) or " ".join(op_name(i) for _, c in _called(inst)
                                          for i in comps.get(c, [])[-1:])
        return any(m in name for m in marks)

    pairs = []
    for name, insts in comps.items():
        halves = {_half(i, comps) for i in insts if _is_matmul(i, comps) and in_pair(i)}
        if halves == {"F", "B"}:
            pairs.append(name)
    stats: dict[str, dict] = {}
    for body in pairs:
        insts = comps[body]
        done_at = {i.operands[0]: k for k, i in enumerate(insts)
                   if i.opcode.endswith("-done") and i.operands}
        for k, inst in enumerate(insts):
            c = _collective(inst, comps)
            if c is None:
                continue
            kind, is_async = c
            s = stats.setdefault(kind, {"count": 0, "async": 0, "with_other_half": 0,
                                        "with_any_matmul": 0})
            s["count"] += 1
            if not is_async:
                continue
            s["async"] += 1
            between = [i for i in insts[k + 1:done_at.get(inst.name, k + 1)]
                       if _is_matmul(i, comps)]
            mine = _half(inst, comps)
            s["with_any_matmul"] += bool(between)
            s["with_other_half"] += any(_half(i, comps) != mine for i in between)
    return {"bodies": len(pairs), "collectives": stats}
