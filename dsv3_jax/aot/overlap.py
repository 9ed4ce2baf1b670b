"""Does dualpipev's F&B pair overlap one chunk's collectives with the other chunk's matmuls?

Read from a compiled step's optimized HLO (`python -m dsv3_jax.aot ... --pipeline-schedule
dualpipev --hlo FILE`, or `compiled.as_text()`). The executor runs a pair as one layer loop
(`LayerStack.forward_backward` in sharding/stage_calculus.py): iteration l is the forward of
layer l of one chunk and the backward of layer n - 1 - l of the other. Its loop body (or the switch branch a one-iteration loop was
inlined into) is found by the stack frames XLA keeps for each instruction: the forward half's instructions were traced
inside `forward_backward`; the backward half's were traced when the residuals' VJP was built
(elsewhere), and run here. For each collective of the body (all-to-all, ragged-all-to-all,
collective-permute, all-gather, all-reduce, reduce-scatter): is it asynchronous (a -start /
-done pair, or an async-start wrapping it), and how many matmuls (dots, convolutions, GEMM
custom calls, fusions or loops containing them) of each half does the schedule place between
its start and done. A synchronous collective overlaps nothing on this stream.
"""

from __future__ import annotations

import re

from dsv3_jax.aot.hlo import Instruction, _called, is_sync, parse

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "collective-permute", "all-gather",
               "all-reduce", "reduce-scatter")
MARKER = ("stage_calculus.py", "forward_backward")   # (file, a word of the function's name)


def _frame_chains(hlo_text: str) -> dict[str, set]:
    """{stack_frame_id: {(file tail, function name)} of every frame of its stack}."""
    head = hlo_text[:hlo_text.find("\n%")] if "\n%" in hlo_text else hlo_text[:200000]

    def table(name, pattern):
        part = head.partition("\n" + name + "\n")[2].split("\n\n")[0]
        return re.findall(pattern, part, re.M)

    files = dict(table("FileNames", r'^(\d+) "([^"]*)"'))
    functions = dict(table("FunctionNames", r'^(\d+) "([^"]*)"'))
    locations = {i: (files.get(f, "").split("/")[-1], functions.get(fn, ""))
                 for i, f, fn in table("FileLocations",
                                       r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)")}
    frames = {i: (loc, parent) for i, loc, parent in
              table("StackFrames", r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")}
    out = {}
    for frame in frames:
        chain, f = set(), frame
        while f in frames and f not in chain:
            loc, parent = frames[f]
            chain.add(f)
            out.setdefault(frame, set()).add(locations.get(loc, ("", "")))
            f = parent
    return out


def _frame(inst: Instruction) -> str:
    m = re.search(r"stack_frame_id=(\d+)", inst.attrs)
    return m.group(1) if m else ""


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


def pair_overlap(hlo_text: str) -> dict:
    """{"bodies": n, "collectives": {kind: {"count", "async", "with_other_half",
    "with_any_matmul"}}} over the F&B pair loop bodies of a dualpipev step."""
    comps, _ = parse(hlo_text)
    chains = _frame_chains(hlo_text)

    def marked(inst) -> bool:
        return any(f == MARKER[0] and MARKER[1] in fn for f, fn in chains.get(_frame(inst), ()))

    def half(inst):
        return "F" if marked(inst) else "B"

    # the loop body (or, for one layer per chunk, the switch branch the loop was inlined into)
    # holding both halves' matmuls
    pairs = [b for b, insts in comps.items()
             if any(marked(i) and _is_matmul(i, comps) for i in insts)
             and any(half(i) == "B" and _is_matmul(i, comps) for i in insts)]
    stats: dict[str, dict] = {}
    for body in pairs:
        insts = comps[body]
        done_at = {}
        for k, inst in enumerate(insts):
            if inst.opcode.endswith("-done") and inst.operands:
                done_at[inst.operands[0]] = k
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
            mine = half(inst)
            s["with_any_matmul"] += bool(between)
            s["with_other_half"] += any(half(i) != mine for i in between)
    return {"bodies": len(pairs), "collectives": stats}
