"""The optimized HLO text XLA prints for a compiled program, read into computations.

`parse(text)` gives each computation's instructions (name, result type, opcode, operand names,
attributes); `multiplicities` how many times each computation runs per execution of the
program (while bodies times their trip count, from XLA's `known_trip_count` or the `i < N` of
the loop condition), and which run asynchronously (called from `async-start`, `fusion-start`
or a `*-start` collective); `source_locations` maps XLA's stack frame ids to this project's
file:line. The printer's format is the same for XLA:CPU, XLA:GPU and the TPU compiler; names
may or may not carry a `%`.
"""

from __future__ import annotations

import math
import re

ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
            "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
            "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
            "f8e4m3": 1, "f8e3m4": 1, "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+?|f4e2m1fn)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_DEF = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = ")
_CALLED = re.compile(r"\b(calls|body|to_apply|condition|true_computation|false_computation|"
                     r"branch_computations|called_computations|async_wrapped_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
# "}" or, for the TPU compiler's SparseCore computations, '}, execution_thread="sparsecore"'
_END = re.compile(r'^\}(, execution_thread="[^"]*")?\s*$')


def arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, shape) of every array in an HLO type (a tuple type gives several)."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(type_str)]


def nbytes(type_str: str) -> int:
    return int(sum(math.prod(s) * ITEMSIZE.get(d, 4) for d, s in arrays(type_str)))


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


class Instruction:
    __slots__ = ("name", "type", "opcode", "operands", "attrs", "line")

    def __init__(self, name, type_, opcode, operands, attrs, line):
        self.name, self.type, self.opcode = name, type_, opcode
        self.operands, self.attrs, self.line = operands, attrs, line


def _parse_instruction(line: str) -> Instruction | None:
    m = _DEF.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_, rest = rest[:end], rest[end:].lstrip()
    else:
        type_, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    end = _balanced("(" + rest, 0) - 1
    # names with or without the % of the optimized HLO's printer; /*index=N*/ comments
    operands = re.findall(r"(?:^|,)\s*(?:/\*index=\d+\*/)?%?([A-Za-z_][\w.\-]*)", rest[:end - 1])
    return Instruction(m.group(1), type_, opcode.strip(), operands, rest[end:], line)


def source_locations(hlo_text: str) -> dict[str, str]:
    """{stack_frame_id: "file.py:line"} for the innermost frame of each stack in this project
    (not in jax), from the tables XLA prints before the computations."""
    head = hlo_text[:hlo_text.find("\n%")]

    def table(name, pattern):
        part = head.partition("\n" + name + "\n")[2].split("\n\n")[0]
        return re.findall(pattern, part, re.M)

    files = dict(table("FileNames", r'^(\d+) "([^"]*)"'))
    locations = {i: (f, line) for i, f, line in
                 table("FileLocations", r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)")}
    frames = {i: (loc, parent) for i, loc, parent in
              table("StackFrames", r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")}
    out = {}
    for frame in frames:
        f, seen = frame, set()
        while f in frames and f not in seen:
            seen.add(f)
            loc, parent = frames[f]
            name, line = locations.get(loc, ("", "0"))
            path = files.get(name, "")
            if path and "site-packages" not in path and "/jax/" not in path:
                out[frame] = f"{'/'.join(path.split('/')[-2:])}:{line}"
                break
            f = parent
    return out


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: its instructions}, the entry computation's name)."""
    comps: dict[str, list[Instruction]] = {}
    entry, current, pending = "", None, ""

    def flush():
        inst = _parse_instruction(pending) if pending else None
        if inst is not None:
            comps[current].append(inst)

    for line in hlo_text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h and not line.startswith(" "):
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
            continue
        if _END.match(line):  # a computation's end: a lone brace (or one naming its thread)
            flush()
            current, pending = None, ""
        elif line.startswith(" "):
            flush()
            pending = line
        else:  # an attribute printed over several lines (a TPU kernel's backend_config)
            pending += "\n" + line
    return comps, entry


def _called(inst: Instruction) -> list[tuple[str, str]]:
    out = []
    for key, value in _CALLED.findall(inst.attrs):
        for name in re.findall(r"%?([\w.\-]+)", value):
            out.append((key, name))
    return out


def _trip_count(inst: Instruction, comps) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if m:
        return int(m.group(1))
    cond = dict(_called(inst)).get("condition")
    body = comps.get(cond, [])
    consts = {i.name: i for i in body if i.opcode == "constant"}
    for i in body:
        if i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2:
            c = consts.get(i.operands[1])
            if c is not None:
                v = re.match(r"\s*(-?\d+)", c.line.split("constant(", 1)[1])
                if v:
                    return int(v.group(1))
    return None


def multiplicities(comps, entry) -> tuple[dict[str, int], set[str], int]:
    """(times each computation runs per step, the computations run asynchronously, loops whose
    trip count is unknown)."""
    mult: dict[str, int] = {}
    asynchronous: set[str] = set()
    unknown = 0
    order = [(entry, 1, False)]
    while order:
        name, m, is_async = order.pop()
        mult[name] = mult.get(name, 0) + m
        if is_async:
            asynchronous.add(name)
        for inst in comps.get(name, []):
            calls = _called(inst)
            if not calls:
                continue
            times = m
            if inst.opcode == "while":
                n = _trip_count(inst, comps)
                if n is None:
                    unknown += 1
                times = m * (n or 1)
            wraps = inst.opcode in ("async-start", "fusion-start") or (
                inst.opcode.endswith("-start") and not is_sync(inst))
            for key, callee in calls:
                if callee not in comps or key == "condition" or (
                        key == "to_apply" and inst.opcode != "call"):  # reducers, comparators
                    continue
                order.append((callee, times if key == "body" else m, is_async or wraps))
    return mult, asynchronous, unknown


def is_sync(inst: Instruction) -> bool:
    return '"is_sync":true' in inst.attrs


def op_name(inst: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', inst.attrs)
    return m.group(1) if m else ""


def attr(inst: Instruction, key: str) -> str:
    m = re.search(key + r"=(\d+)", inst.attrs)
    return m.group(1) if m else ""
