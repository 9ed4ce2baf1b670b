"""Pipeline schedules as data: a static table of (tick, stage, micro-batch, chunk, kind) actions.

Pure Python (no JAX): `sharding/pipeline_executor.py` runs a table inside the shard_map over
the pipeline axis, and the planner (dsv3_jax/plan.py) sizes its buffers from it. Kinds:
`F` a forward chunk, `BW` a full backward (input and weight gradients), `B` the input-gradient
half only and `W` the weight-gradient half, deferred (zero-bubble schedules).

A stage is a device on the pipeline axis (P of them). Each holds one chunk of the pipelined
layers, or two for `dualpipev`: the V of DualPipeV (DeepSeek-AI's DualPipe repository, after
Sea AI Lab's "cut-in-half"), where device d holds virtual stages d and 2P - 1 - d, so
micro-batches go down the devices through chunk 0 and back up through chunk 1, entering and
leaving (the loss) at device 0. Schedules:
- `gpipe`: all M forwards, then all backwards (in reverse, as autodiff of the tick loop runs
  them); every stage holds M micro-batches' activations;
- `1f1b`: PipeDream-flush: P - 1 - d warm-up forwards on stage d, then one forward and one
  backward in turn; at most P - d micro-batches in flight on stage d;
- `zb`: ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with each backward split
  into B and W; B stays on the critical path and stage s defers each W by s micro-batches,
  so the W's fill 1F1B's tail; at most P micro-batches in flight on every stage (1F1B's
  first stage's, which sets the SPMD buffers' size anyway);
- `dualpipev`: the per-rank step sequence of DualPipe's `dualpipev.py` (steps 1-8): forward
  of one chunk paired in one tick with the backward of the other chunk (`F&B`), and the
  weight halves deferred where that file defers them. Needs M >= 2P.

Ticks: each device runs its actions in the schedule's order; an action takes the first tick at
which everything it needs was produced in an earlier tick (a value crosses to the neighbour at
the end of its tick, `ppermute`). All devices advance tick by tick, as the SPMD executor runs
them (a lax.scan over ticks). Two timings are computed from a table, with `Costs`:
- `bubble(costs)`: each device runs its actions in table order as soon as their inputs exist
  (event-driven, the idealised timing of the DualPipe paper's table);
- `bubble(costs, lockstep=True)`: every tick lasts as long as its slowest device's action
  (how the SPMD tick loop runs when the stages' ticks synchronise on the ppermutes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

SCHEDULES = ("gpipe", "1f1b", "zb", "dualpipev")
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
        key = _keyer(self)
        queues = [[c for c in row if c] for row in self.by_tick]
        free = [0.0] * self.stages
        pos = [0] * self.stages
        while any(p < len(q) for p, q in zip(pos, queues)):
            progress = False
            for s in range(self.stages):
                while pos[s] < len(queues[s]):
                    group = queues[s][pos[s]]
                    needs = [n for a in group for n in _needs(a, key)]
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
        key = _keyer(self)
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
            for n in _needs(a, key):
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


def _keyer(sched: Schedule):
    """Keys of what an action produces: ("F", v, i) its output, ("X", v, i) its input gradient,
    ("W", v, i) its weight gradient (a BW produces both)."""
    def key(a: Action) -> tuple:
        v = sched.virtual(a.stage, a.chunk)
        return {"F": (("F", v, a.micro),), "B": (("X", v, a.micro),),
                "W": (("W", v, a.micro),), "BW": (("X", v, a.micro), ("W", v, a.micro))}[a.kind]
    key.last = sched.virtual_stages - 1
    return key


def _needs(a: Action, key) -> list[tuple]:
    (kind, v, i), last = key(a)[0], key.last
    if kind == "F":
        return [("F", v - 1, i)] if v else []
    if kind == "X":
        return [("F", v, i)] + ([("X", v + 1, i)] if v < last else [])
    return [("X", v, i)]  # W


# ------------------------------------------------------------------------------- builders
def _lockstep(name: str, stages: int, micro: int, chunks: int, programs) -> Schedule:
    """Ticks for per-stage programs (lists of steps, a step = actions of one tick without
    their tick): each stage runs its next step at the first tick whose inputs were all
    produced in earlier ticks."""
    proto = Schedule(name, stages, micro, chunks, ())
    key = _keyer(proto)
    done: dict[tuple, int] = {}
    pos, actions, t = [0] * stages, [], 0
    total = sum(len(p) for p in programs)
    while sum(pos) < total:
        fired = []
        for s in range(stages):
            if pos[s] < len(programs[s]):
                step = [Action(t, s, i, c, k) for k, c, i in programs[s][pos[s]]]
                if all(done.get(n, t) < t for a in step for n in _needs(a, key)):
                    fired.append(step)
                    pos[s] += 1
        for step in fired:
            for a in step:
                actions.append(a)
                for k in key(a):
                    done[k] = t
        t += 1
        if t > 4 * total + 8:
            raise ScheduleError(f"{name}: the programs deadlock")
    return Schedule(name, stages, micro, chunks, tuple(sorted(actions)))


def gpipe(stages: int, micro: int) -> Schedule:
    """All forwards, then all full backwards in reverse micro-batch order."""
    prog = [[(("F", 0, i),) for i in range(micro)] +
            [(("BW", 0, i),) for i in reversed(range(micro))] for _ in range(stages)]
    return _lockstep("gpipe", stages, micro, 1, prog)


def one_f_one_b(stages: int, micro: int) -> Schedule:
    """PipeDream-flush 1F1B."""
    programs = []
    for s in range(stages):
        warm = min(stages - 1 - s, micro)
        prog = [(("F", 0, i),) for i in range(warm)]
        for j in range(micro - warm):
            prog += [(("F", 0, warm + j),), (("BW", 0, j),)]
        prog += [(("BW", 0, j),) for j in range(micro - warm, micro)]
        programs.append(prog)
    return _lockstep("1f1b", stages, micro, 1, programs)


def zero_bubble(stages: int, micro: int) -> Schedule:
    """ZB-H1: 1F1B's order with each backward split; stage s runs the W of a micro-batch after
    the B of the s-th next one (the last stage's W's wait longest), which fills 1F1B's
    tail with W's and keeps at most P micro-batches in flight on every stage."""
    programs = []
    for s in range(stages):
        warm = min(stages - 1 - s, micro)
        prog = [(("F", 0, i),) for i in range(warm)]
        pending: collections.deque = collections.deque()
        for j in range(micro):
            if warm + j < micro:
                prog.append((("F", 0, warm + j),))
            prog.append((("B", 0, j),))
            pending.append(j)
            if len(pending) > s:
                prog.append((("W", 0, pending.popleft()),))
        prog += [(("W", 0, j),) for j in pending]
        programs.append(prog)
    return _lockstep("zb", stages, micro, 1, programs)


def dualpipev(stages: int, micro: int) -> Schedule:
    """DualPipeV: DualPipe's `dualpipev.py` steps 1-8 per rank (module docstring)."""
    P, M = stages, micro
    if M < 2 * P:
        raise ScheduleError(f"dualpipev needs at least 2 x {P} stages = {2 * P} micro-batches, "
                            f"got {M}")
    programs = []
    for r in range(P):
        nf, nb, wq, prog = [0, 0], [0, 0], collections.deque(), []

        def F(ph):
            nf[ph] += 1
            return ("F", ph, nf[ph] - 1)

        def B(ph, split):
            nb[ph] += 1
            if split:
                wq.append((ph, nb[ph] - 1))
            return ("B" if split else "BW", ph, nb[ph] - 1)

        def W():
            ph, i = wq.popleft()
            return ("W", ph, i)

        prog += [(F(0),) for _ in range((P - r - 1) * 2)]                  # 1: nF0
        for _ in range(r + 1):                                               # 2: nF0F1
            prog += [(F(0),), (F(1),)]
        for _ in range(P - r - 1):                                           # 3: nB1W1F1
            prog += [(B(1, True),), (W(),), (F(1),)]
        for i in range(M - 2 * P + r + 1):                                   # 4: nF0B1F1B0
            if i == 0 and r == P - 1:  # not overlapped, "to further reduce bubble size"
                prog += [(F(0),), (B(1, False),)]
            else:
                prog += [(F(0), B(1, False))]
            prog += [(F(1), B(0, False))]
        for _ in range(P - r - 1):                                           # 5: nB1F1B0
            prog += [(B(1, False),), (F(1), B(0, False))]
        split, half = False, (r + 1) // 2                                    # 6: nB1B0
        for i in range(r + 1):
            split = split or (i == half and r % 2 == 1)
            prog += [(B(1, split),)]
            split = split or (i == half and r % 2 == 0)
            prog += [(B(0, split),)]
        for _ in range(P - r - 1):                                           # 7: nWB0
            prog += [(W(),), (B(0, True),)]
        prog += [(W(),) for _ in range(r + 1)]                               # 8: nW
        assert not wq and nf == [M, M] and nb == [M, M], (r, nf, nb)
        programs.append(prog)
    return _lockstep("dualpipev", P, M, 2, programs)


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb": zero_bubble, "dualpipev": dualpipev}


def make_schedule(name: str, stages: int, microbatches: int) -> Schedule:
    """The named schedule's table (validated)."""
    if name not in BUILDERS:
        raise ScheduleError(f"--pipeline-schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    if stages < 1 or microbatches < 1:
        raise ScheduleError(f"stages and micro-batches must be >= 1, got {stages}, {microbatches}")
    sched = BUILDERS[name](stages, microbatches)
    sched.validate()
    return sched


def for_mesh(mesh_spec: str, microbatches: int, name: str) -> Schedule:
    """The schedule a run with `--mesh mesh_spec --microbatches N` would use (N = 0: one per
    stage), from the spec alone (no devices needed)."""
    sizes = dict(part.split("=") for part in mesh_spec.replace(" ", "").split(",") if "=" in part)
    stages = int(sizes.get("pipeline", 1))
    if stages < 2:
        raise ScheduleError(f"--mesh {mesh_spec or '(none)'} has no pipeline axis > 1: no "
                            "schedule to print")
    return make_schedule(name, stages, microbatches or stages)


def main(argv=None) -> int:
    """`python -m sharding.schedules --schedule 1f1b --stages 4 --microbatches 8`."""
    import argparse
    ap = argparse.ArgumentParser(description="Print a pipeline schedule's table.")
    ap.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        print(make_schedule(args.schedule, args.stages, args.microbatches).format())
    except ScheduleError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
