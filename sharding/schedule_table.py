"""A pipeline schedule's table and what is computed from it: bubbles, activations in flight,
dependency checks, a readable print (the builders of the named schedules: sharding/schedules.py).

`Schedule.actions` holds (tick, stage, micro-batch, chunk, kind) rows; kinds: `F` a forward
chunk, `BW` a full backward (input and weight gradients), `B` the input-gradient half only and
`W` the weight-gradient half (deferred). Timings, with `Costs`:
- `bubble(costs)`: each device runs its actions in table order as soon as their inputs exist
  (event-driven, the idealised timing of the DualPipe paper's table);
- `bubble(costs, lockstep=True)`: every tick lasts as long as its slowest device's action
  (how the SPMD tick loop runs when the stages' ticks synchronise on the ppermutes).
"""

from __future__ import annotations

import dataclasses
import functools

KINDS = ("F", "B", "W", "BW")


class ScheduleError(ValueError):
    """A schedule that cannot be built (unknown name, too few micro-batches)."""


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    tick: int
    stage: int      # the device on the pipeline axis
    micro: int
    chunk: int      # which of the stage's chunks: 0, or 1 for the V's way back up
    kind: str       # F, B, W or BW


@dataclasses.dataclass(frozen=True)
class Costs:
    """Durations of a forward chunk (F), a full backward chunk (B), its weight half (W) and an
    overlapped forward + backward pair (FB; None: F + B, no overlap)."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None

    def of(self, actions) -> float:
        kinds = sorted(a.kind for a in actions)
        if not kinds:
            return 0.0
        if len(kinds) == 2:  # an F&B pair
            back = self.B if "BW" in kinds else self.B - self.W
            return self.FB if self.FB is not None and "BW" in kinds else self.F + back
        return {"F": self.F, "BW": self.B, "B": self.B - self.W, "W": self.W}[kinds[0]]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A static action table for P stages and M micro-batches (see the module docstring)."""

    name: str
    stages: int
    microbatches: int
    chunks: int
    actions: tuple[Action, ...]

    @property
    def virtual_stages(self) -> int:
        return self.stages * self.chunks

    @property
    def ticks(self) -> int:
        return 1 + max(a.tick for a in self.actions)

    @property
    def split_backward(self) -> bool:
        """Whether any backward is split into B and W."""
        return any(a.kind == "W" for a in self.actions)

    def virtual(self, stage: int, chunk: int) -> int:
        """The virtual stage (position along the layers) of a stage's chunk."""
        return stage if chunk == 0 else 2 * self.stages - 1 - stage

    def place(self, virtual: int) -> tuple[int, int]:
        """(stage, chunk) holding a virtual stage."""
        return (virtual, 0) if virtual < self.stages else (2 * self.stages - 1 - virtual, 1)

    @functools.cached_property
    def by_tick(self) -> tuple[tuple[tuple[Action, ...], ...], ...]:
        """[stage][tick] -> the actions of that stage in that tick (0, 1, or an F&B pair)."""
        grid = [[[] for _ in range(self.ticks)] for _ in range(self.stages)]
        for a in self.actions:
            grid[a.stage][a.tick].append(a)
        return tuple(tuple(tuple(sorted(c, key=lambda a: a.kind != "F")) for c in row)
                     for row in grid)

    def bubble(self, costs: Costs = Costs(), *, lockstep: bool = False) -> list[float]:
        """Each stage's idle time in one step (the step's duration less its own work)."""
        busy = [sum(costs.of(c) for c in row) for row in self.by_tick]
        if lockstep:
            span = sum(max(costs.of(self.by_tick[s][t]) for s in range(self.stages))
                       for t in range(self.ticks))
        else:
            span = max(self._event_finish(costs).values())
        return [span - b for b in busy]

    def bubble_fraction(self, costs: Costs = Costs(), *, lockstep: bool = False) -> float:
        """The largest stage's idle share of the step's duration."""
        idle = self.bubble(costs, lockstep=lockstep)
        span = idle[0] + sum(costs.of(c) for c in self.by_tick[0])
        return max(idle) / span

    def _event_finish(self, costs: Costs) -> dict:
        """Finish time of every action when each stage runs its actions in table order, each as
        soon as the stage is free and its inputs exist (no communication time)."""
        done: dict[tuple, float] = {}
        key = action_keys(self)
        queues = [[c for c in row if c] for row in self.by_tick]
        free = [0.0] * self.stages
        pos = [0] * self.stages
        while any(p < len(q) for p, q in zip(pos, queues)):
            progress = False
            for s in range(self.stages):
                while pos[s] < len(queues[s]):
                    group = queues[s][pos[s]]
                    needs = [n for a in group for n in inputs_of(a, key)]
                    if any(n not in done for n in needs):
                        break
                    start = max([free[s]] + [done[n] for n in needs])
                    free[s] = start + costs.of(group)
                    for a in group:
                        for k in key(a):
                            done[k] = free[s]
                    pos[s] += 1
                    progress = True
            if not progress:
                raise ScheduleError(f"{self.name}: the table deadlocks")
        return done

    def in_flight(self) -> list[list[int]]:
        """[stage][tick] micro-batch chunks whose activations are held during the tick: counted
        from their F, released after their BW (or after W when the backward is split, which
        still reads them). An F&B pair's tick holds both."""
        out = []
        for row in self.by_tick:
            held, series = 0, []
            for cell in row:
                held += sum(a.kind == "F" for a in cell)
                series.append(held)
                held -= sum(a.kind in ("BW", "W") for a in cell)
            out.append(series)
        return out

    def peak_activations(self) -> list[int]:
        """Per stage: the most micro-batch chunks whose activations are held at once."""
        return [max(s) for s in self.in_flight()]

    def validate(self) -> None:
        """Raise ScheduleError unless every micro-batch runs each virtual stage's forward once
        and its backward once (BW, or B then W), and every action comes after what it reads:
        F after the previous virtual stage's F, a backward after its own F and after the next
        virtual stage's input gradient, W after its B; each value is sent at the end of its
        tick and received later (strictly increasing ticks); at most one F and one backward
        per stage and tick (an F&B pair), or one W alone."""
        key = action_keys(self)
        seen: dict[tuple, int] = {}
        for a in self.actions:
            if not (0 <= a.stage < self.stages and 0 <= a.micro < self.microbatches
                    and 0 <= a.chunk < self.chunks and a.kind in KINDS):
                raise ScheduleError(f"{self.name}: bad action {a}")
            for k in key(a):
                if k in seen:
                    raise ScheduleError(f"{self.name}: {k} runs twice")
                seen[k] = a.tick
        for v in range(self.virtual_stages):
            for i in range(self.microbatches):
                for k in (("F", v, i), ("X", v, i), ("W", v, i)):
                    if k not in seen:
                        raise ScheduleError(f"{self.name}: {k} never runs")
        for a in self.actions:
            for n in inputs_of(a, key):
                if seen[n] >= a.tick:
                    raise ScheduleError(f"{self.name}: {a} does not come after {n} "
                                        f"(tick {seen[n]})")
        for s, row in enumerate(self.by_tick):
            for t, cell in enumerate(row):
                kinds = sorted(a.kind for a in cell)
                if len(cell) > 2 or (len(cell) == 2 and (kinds[1] != "F" or kinds[0] == "W")):
                    raise ScheduleError(f"{self.name}: stage {s} tick {t} runs {cell}")

    def format(self, width: int | None = None) -> str:
        """A readable table: one line per stage, one column per tick. `F3` forward of micro-
        batch 3, `B3` / `W3` its input / weight gradient, `BW3` both; `^` marks the V's second
        chunk (dualpipev), `+` an F&B pair in one tick."""
        def cell(c):
            return "+".join(f"{a.kind}{a.micro}{'^' if a.chunk else ''}" for a in c) or "."
        cells = [[cell(c) for c in row] for row in self.by_tick]
        w = width or max(len(c) for row in cells for c in row)
        lines = [f"{self.name}: {self.stages} stages x {self.chunks} chunk(s), "
                 f"{self.microbatches} micro-batches, {self.ticks} ticks"]
        lines.append("tick    " + " ".join(f"{t:<{w}}" for t in range(self.ticks)))
        for s, row in enumerate(cells):
            lines.append(f"stage {s} " + " ".join(f"{c:<{w}}" for c in row))
        costs = Costs()
        lines.append(f"bubble per stage (F=1, B=2, W=1; event-driven / lockstep ticks): "
                     f"{fmt(self.bubble(costs))} / {fmt(self.bubble(costs, lockstep=True))}")
        lines.append(f"peak in-flight micro-batch chunks per stage: {self.peak_activations()}")
        return "\n".join(lines)


def fmt(xs) -> str:
    return "[" + ", ".join(f"{x:g}" for x in xs) + "]"


def action_keys(sched: Schedule):
    """Keys of what an action produces: ("F", v, i) its output, ("X", v, i) its input gradient,
    ("W", v, i) its weight gradient (a BW produces both)."""
    def key(a: Action) -> tuple:
        v = sched.virtual(a.stage, a.chunk)
        return {"F": (("F", v, a.micro),), "B": (("X", v, a.micro),),
                "W": (("W", v, a.micro),), "BW": (("X", v, a.micro), ("W", v, a.micro))}[a.kind]
    key.last = sched.virtual_stages - 1
    return key


def inputs_of(a: Action, key) -> list[tuple]:
    (kind, v, i), last = key(a)[0], key.last
    if kind == "F":
        return [("F", v - 1, i)] if v else []
    if kind == "X":
        return [("F", v, i)] + ([("X", v + 1, i)] if v < last else [])
    return [("X", v, i)]  # W
