"""A schedule table compiled for the SPMD executor: buffer slots, branches and per-tick fields.

Pure Python and NumPy. `sharding/pipeline_executor.py` runs one `lax.switch` branch per stage
and tick; every stage runs the same program, so what differs between stages is data: the
integer fields of `Program.table[tick, stage]` (which branch, which micro-batch, which buffer
slot to read or write). Buffers have a fixed number of slots, computed here from the table by
interval colouring (a slot is reused once its value was last read):
- residuals: the per-stage `jax.vjp` residuals of a micro-batch chunk, from its F to its BW
  (or to its W when the backward is split): `Schedule.peak_activations` slots;
- post residuals: the loss head's residuals on the last virtual stage, from F to backward;
- stash: a split backward's values that B computes and W reads (B to W);
- act / grad inboxes: activations / gradients received from a neighbour (or handed from one
  chunk to the other on the V's turn) until the F / backward that reads them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sharding.schedules import Action, Schedule

# the per-tick fields of a stage (columns of Program.table); -1: none
FIELDS = ("branch", "f_micro", "f_in", "f_res", "f_post", "b_micro", "b_ct", "b_res", "b_post",
          "b_first", "b_stash", "w_micro", "w_res", "w_stash",
          "recv_act_down", "recv_act_up", "recv_grad_down", "recv_grad_up",
          "local_act", "local_grad")
COL = {name: i for i, name in enumerate(FIELDS)}

# an op of a branch: (kind, chunk) with kind F, B, BW or W. Whether an op runs the last virtual
# stage (whose F also computes the loss and whose backward starts from it) is data: the
# f_post / b_post fields are >= 0 there.
Op = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Program:
    schedule: Schedule
    branches: tuple[tuple[Op, ...], ...]   # branch 0 is idle: ()
    table: np.ndarray                      # int32 [ticks, stages, len(FIELDS)]
    slots: dict                            # buffer name -> slots (at least 1)
    channels: frozenset                    # ("act" | "grad", "down" | "up") messages sent

    @property
    def ticks(self) -> int:
        return self.table.shape[0]


def _colour(intervals: list[tuple[int, int, object]], strict: bool) -> tuple[dict, int]:
    """Slots for [start, end] intervals (keyed by their third item): a slot is reused by an
    interval starting after (strict) or at (not strict) the tick its last holder ended."""
    free_at: list[int] = []
    slot = {}
    for start, end, key in sorted(intervals, key=lambda x: (x[0], x[1])):
        for k, t in enumerate(free_at):
            if (t < start) if strict else (t <= start):
                free_at[k] = end
                slot[key] = k
                break
        else:
            slot[key] = len(free_at)
            free_at.append(end)
    return slot, len(free_at)


def compile_program(sched: Schedule) -> Program:
    """The executor's program for a validated schedule table."""
    P, last = sched.stages, sched.virtual_stages - 1
    by_key: dict[tuple, Action] = {}
    for a in sched.actions:
        v = sched.virtual(a.stage, a.chunk)
        by_key[(a.kind, v, a.micro)] = a
    back = {k[1:]: a for k, a in by_key.items() if k[0] in ("B", "BW")}

    def release(v, i) -> Action:  # the last action that reads (v, i)'s residuals
        return by_key.get(("W", v, i)) or back[(v, i)]

    table = np.full((sched.ticks, P, len(FIELDS)), -1, np.int32)
    branches: list[tuple[Op, ...]] = [()]
    channels = set()
    slots = {}
    # residuals, post residuals and stash, per stage
    for s in range(P):
        res, post, stash = [], [], []
        for a in sched.actions:
            if a.stage != s or a.kind != "F":
                continue
            v = sched.virtual(s, a.chunk)
            res.append((a.tick, release(v, a.micro).tick, (v, a.micro)))
            if v == last:
                post.append((a.tick, back[(v, a.micro)].tick, (v, a.micro)))
            if ("W", v, a.micro) in by_key:
                stash.append((back[(v, a.micro)].tick, by_key[("W", v, a.micro)].tick, (v, a.micro)))
        for name, iv in (("res", res), ("post", post), ("stash", stash)):
            slot, n = _colour(iv, strict=True)
            slots[name] = max(slots.get(name, 1), n)
            for (_, _, key) in iv:
                a_f = by_key[("F", *key)]
                if name == "res":
                    table[a_f.tick, s, COL["f_res"]] = slot[key]
                    b = back[key]
                    table[b.tick, s, COL["b_res"]] = slot[key]
                    if ("W", *key) in by_key:
                        table[by_key[("W", *key)].tick, s, COL["w_res"]] = slot[key]
                elif name == "post":
                    table[a_f.tick, s, COL["f_post"]] = slot[key]
                    table[back[key].tick, s, COL["b_post"]] = slot[key]
                else:
                    table[back[key].tick, s, COL["b_stash"]] = slot[key]
                    table[by_key[("W", *key)].tick, s, COL["w_stash"]] = slot[key]
    # messages: F of v feeds F of v + 1, the backward of v feeds the backward of v - 1
    inbox = {("act", s): [] for s in range(P)} | {("grad", s): [] for s in range(P)}
    routes = []  # (kind, sender tick, sender stage, receiver stage, key)
    for (kind, v, i), a in by_key.items():
        if kind == "F" and v < last:
            dst = by_key[("F", v + 1, i)]
            routes.append(("act", a, dst, (v + 1, i)))
        elif kind in ("B", "BW") and v > 0:
            dst = back[(v - 1, i)]
            routes.append(("grad", a, dst, (v - 1, i)))
    for kind, src, dst, key in routes:
        inbox[(kind, dst.stage)].append((src.tick, dst.tick, key))
    placed = {}
    for (kind, s), iv in inbox.items():
        slot, n = _colour(iv, strict=False)
        slots[kind] = max(slots.get(kind, 1), n)
        placed.update({(kind, key): k for key, k in slot.items()})
    for kind, src, dst, key in routes:
        k = placed[(kind, key)]
        table[dst.tick, dst.stage, COL["f_in" if kind == "act" else "b_ct"]] = k
        if dst.stage == src.stage:
            table[src.tick, src.stage, COL[f"local_{kind}"]] = k
        else:
            way = "down" if dst.stage == src.stage + 1 else "up"
            assert abs(dst.stage - src.stage) == 1, (src, dst)
            channels.add((kind, way))
            table[src.tick, dst.stage, COL[f"recv_{kind}_{way}"]] = k
    # branches and the per-op fields
    for s, row in enumerate(sched.by_tick):
        for t, cell in enumerate(row):
            if not cell:
                table[t, s, COL["branch"]] = 0
                continue
            ops = []
            for a in sorted(cell, key=lambda a: a.kind == "F"):  # backward first
                v = sched.virtual(s, a.chunk)
                ops.append((a.kind, a.chunk))
                if a.kind == "F":
                    table[t, s, COL["f_micro"]] = a.micro
                elif a.kind == "W":
                    table[t, s, COL["w_micro"]] = a.micro
                else:
                    table[t, s, COL["b_micro"]] = a.micro
                    table[t, s, COL["b_first"]] = int(v == 0)
            ops = tuple(ops)
            if ops not in branches:
                branches.append(ops)
            table[t, s, COL["branch"]] = branches.index(ops)
    return Program(sched, tuple(branches), table, slots, frozenset(channels))
