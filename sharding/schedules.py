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
them (a lax.scan over ticks). Bubbles and activations in flight are computed from the table
(sharding/schedule_table.py).
"""

from __future__ import annotations

import collections

from sharding.schedule_table import (KINDS, Action, Costs, Schedule, ScheduleError,  # noqa: F401
                                     action_keys, inputs_of)

SCHEDULES = ("gpipe", "1f1b", "zb", "dualpipev")


# ------------------------------------------------------------------------------- builders
def _lockstep(name: str, stages: int, micro: int, chunks: int, programs) -> Schedule:
    """Ticks for per-stage programs (lists of steps, a step = actions of one tick without
    their tick): each stage runs its next step at the first tick whose inputs were all
    produced in earlier ticks."""
    proto = Schedule(name, stages, micro, chunks, ())
    key = action_keys(proto)
    done: dict[tuple, int] = {}
    pos, actions, t = [0] * stages, [], 0
    total = sum(len(p) for p in programs)
    while sum(pos) < total:
        fired = []
        for s in range(stages):
            if pos[s] < len(programs[s]):
                step = [Action(t, s, i, c, k) for k, c, i in programs[s][pos[s]]]
                if all(done.get(n, t) < t for a in step for n in inputs_of(a, key)):
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
