"""Run a schedule's program (sharding/schedule_program.py) inside the shard_map over the stages.

One `lax.scan` over the ticks; at each tick every stage looks up its row of the table (by
`axis_index`) and runs one `lax.switch` branch: idle, an F, a backward (BW, or its B half),
a W, or an F&B pair. Then activations go to the next stage and gradients to the previous one
with `ppermute` (every tick, a fixed set of channels; a stage stores what it receives into
the inbox slot its row names, or drops it). A scan rather than ticks unrolled in Python: the
body, and so the compile time, does not grow with the micro-batches or stages (the table is
data, [ticks, stages, fields] int32); only the distinct branches are traced.

Differentiation is explicit, per stage, micro-batch and layer (sharding/stage_calculus.py):
F runs a `jax.vjp` per layer and stores the residuals in a fixed-size buffer (as many slots
as the table keeps micro-batches in flight: P for 1F1B, M for GPipe); the backward rebuilds
the VJPs from a slot and the stage's current parameters (never stored) and adds each layer's
weight gradients to the stage's accumulator. No autodiff runs through the tick loop, so
nothing holds every tick's residuals. A split backward (zb, dualpipev) runs the input-
gradient half in B and the weight-gradient half in W (sharding/backward_split.py); an F&B
pair runs as one layer loop. The last virtual stage's F also runs the loss head (`post`:
norm, MTP, chunked cross entropy, a `lax.cond` on the row's `f_post`), whose backward starts
the stage's backward from d(loss) = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sharding.schedule_program import COL, Program
from sharding.stage_calculus import LayerStack, Vjp

AXIS = "pipeline"

# bytes of the executor's buffers in the last program traced, per stage (the shapes the stage
# program sees: summed over the stage's devices); diagnostics for python -m dsv3_jax.aot
last_buffers: dict[str, int] = {}


def _write(buf, slot, value):
    """buf[slot] = value where slot >= 0 (a traced int)."""
    k = jnp.maximum(slot, 0)
    return jax.lax.dynamic_update_index_in_dim(
        buf, jnp.where(slot >= 0, value.astype(buf.dtype), buf[k]), k, 0)


def _write_all(bufs, slot, values):
    return [_write(b, slot, v) for b, v in zip(bufs, values)]


def _read_all(bufs, slot):
    k = jnp.maximum(slot, 0)
    return [b[k] for b in bufs]


@dataclasses.dataclass
class StageSetup:
    """What the executor needs besides the program."""

    stack: LayerStack               # the stage's chunk of layers
    post: Vjp                       # the loss head (last virtual stage)
    consts: Callable                # i -> the layers' constants of micro-batch i (rotary, segments)
    make_post: Callable             # i -> fun(post_params, y) -> (loss, aux) of micro-batch i
    params: list                    # [chunks * layers, ...] leaves: chunk c from layer c * n
    post_params: object
    xs: jax.Array                   # [M, mb, seq, embed] (virtual stage 0's inputs)
    balance_ct: float               # d loss / d (a layer's balance term of one micro-batch)
    act_dtype: object               # the activations' (compute) dtype


def run_program(prog: Program, st: StageSetup):
    """The stage's part of the schedule: (accumulators, stage gradients, loss-head gradients,
    d xs). Call inside the shard_map (pipeline axis manual)."""
    P, chunks = prog.schedule.stages, prog.schedule.chunks
    stage = jax.lax.axis_index(AXIS)
    act_shape, act_dtype = st.xs.shape[1:], st.act_dtype
    n = st.stack.n
    x0 = jnp.zeros(act_shape, act_dtype)

    # shapes of residuals, outputs and aux: one abstract trace each (also fixes the treedefs)
    def probe_chunk():
        return st.stack.forward(st.params, 0, x0, st.consts(0))

    (_, bal_s), aux_s, res_s = jax.eval_shape(probe_chunk)

    def probe_post():
        return st.post.forward(st.make_post(0), st.post_params, x0)

    loss_s, post_aux_s, post_res_s = jax.eval_shape(probe_post)
    zeros = lambda s, n=None: jnp.zeros(s.shape if n is None else (n, *s.shape), s.dtype)  # noqa: E731
    ct_balance = jnp.full(bal_s.shape[1:], st.balance_ct, bal_s.dtype)  # one layer's
    stash_s = []
    if prog.schedule.split_backward:
        st.stack.build_split(st.params, x0, st.consts(0), ct_balance)
        stash_s = [jax.ShapeDtypeStruct((n, *s.shape), s.dtype) for s in st.stack.split.stash_avals]
    # Buffers: read inside the switch, written after it by the row's slots (the branches only
    # return the one slot they fill). XLA:CPU copies whatever a conditional returns, every
    # tick; the accumulators (gradients, loss, counts) are all that goes through the switch.
    bufs = dict(res=[zeros(s, prog.slots["res"]) for s in res_s],
                post_res=[zeros(s, prog.slots["post"]) for s in post_res_s],
                stash=[zeros(s, prog.slots["stash"]) for s in stash_s],
                act=jnp.zeros((prog.slots["act"], *act_shape), act_dtype),
                grad=jnp.zeros((prog.slots["grad"], *act_shape), act_dtype),
                dxs=jnp.zeros(st.xs.shape, act_dtype))
    acc = dict(grads=[jnp.zeros_like(v) for v in st.params],
               post_grads=jax.tree.map(jnp.zeros_like, st.post_params),
               loss=jnp.zeros((), jnp.float32),
               aux={k: jnp.zeros((chunks, *v.shape), v.dtype) for k, v in aux_s.items()}
               | {"balance": jnp.zeros((chunks, *bal_s.shape), bal_s.dtype)},
               post_aux=jax.tree.map(zeros, post_aux_s))
    nothing = dict(res=[zeros(s) for s in res_s], post_res=[zeros(s) for s in post_res_s],
                   stash=[zeros(s) for s in stash_s], act=x0, grad=x0)

    def nbytes(tree):
        return sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(tree))
    last_buffers.clear()
    last_buffers.update({k: nbytes(bufs[k]) for k in bufs})
    last_buffers.update({k: nbytes(acc[k]) for k in ("grads", "post_grads")})

    def f_input(bufs, row):
        i, inn = row[COL["f_micro"]], row[COL["f_in"]]
        return jnp.where(inn < 0, st.xs[i].astype(act_dtype), bufs["act"][jnp.maximum(inn, 0)])

    def f_finish(acc, out, row, c, fwd):
        """An F's outputs: residuals, statistics; the loss head on the last virtual stage."""
        ((y, bal), aux, res), i = fwd, row[COL["f_micro"]]
        new_aux = dict(aux, balance=bal)
        acc = dict(acc, aux={k: acc["aux"][k].at[c].add(new_aux[k]) for k in acc["aux"]},
                   loss=acc["loss"] + st.balance_ct * jnp.sum(bal))

        def post(acc):  # the last virtual stage: the loss head
            lp, post_aux, post_res = st.post.forward(st.make_post(i), st.post_params,
                                                     y.astype(act_dtype))
            return dict(acc, loss=acc["loss"] + lp,
                        post_aux=jax.tree.map(jnp.add, acc["post_aux"], post_aux)), post_res

        acc, post_res = jax.lax.cond(row[COL["f_post"]] >= 0, post,
                                     lambda acc: (acc, nothing["post_res"]), acc)
        return acc, dict(out, res=res, post_res=post_res, act=y.astype(act_dtype))

    def do_f(bufs, acc, out, row, c):
        fwd = st.stack.forward(st.params, c * n, f_input(bufs, row), st.consts(row[COL["f_micro"]]))
        return f_finish(acc, out, row, c, fwd)

    def ct_of(bufs, acc, row):
        """The gradient arriving at a backward's outputs: from the loss head on the last
        virtual stage (whose gradients are added here), else from the inbox."""
        def post(acc):
            res = _read_all(bufs["post_res"], row[COL["b_post"]])
            d_post, dy = st.post.backward(st.post_params, res, jnp.ones((), loss_s.dtype))
            grads = jax.tree.map(lambda a, d: a + d.astype(a.dtype), acc["post_grads"], d_post)
            return dict(acc, post_grads=grads), dy.astype(act_dtype)

        def inbox(acc):
            return acc, bufs["grad"][jnp.maximum(row[COL["b_ct"]], 0)]
        return jax.lax.cond(row[COL["b_post"]] >= 0, post, inbox, acc)

    def do_bw(bufs, acc, out, row, c):
        acc, dy = ct_of(bufs, acc, row)
        res = _read_all(bufs["res"], row[COL["b_res"]])
        dx, grads = st.stack.backward(st.params, c * n, res, st.consts(row[COL["b_micro"]]),
                                      dy.astype(act_dtype), ct_balance, acc["grads"])
        return dict(acc, grads=grads), dict(out, grad=dx.astype(act_dtype))

    def do_pair(bufs, acc, out, row, cf, cb):
        """F of chunk cf and BW of chunk cb in one layer loop (LayerStack.forward_backward)."""
        acc, dy = ct_of(bufs, acc, row)
        res = _read_all(bufs["res"], row[COL["b_res"]])
        fwd, (dx, grads) = st.stack.forward_backward(
            st.params, cf * n, f_input(bufs, row), st.consts(row[COL["f_micro"]]), cb * n, res,
            st.consts(row[COL["b_micro"]]), dy.astype(act_dtype), ct_balance, acc["grads"])
        return f_finish(dict(acc, grads=grads), dict(out, grad=dx.astype(act_dtype)), row, cf,
                        fwd)

    def do_b(bufs, acc, out, row, c):
        acc, dy = ct_of(bufs, acc, row)
        res = _read_all(bufs["res"], row[COL["b_res"]])
        dx, stash = st.stack.input_grad(st.params, c * n, res, st.consts(row[COL["b_micro"]]),
                                        dy.astype(act_dtype), ct_balance)
        return acc, dict(out, grad=dx.astype(act_dtype), stash=stash)

    def do_w(bufs, acc, out, row, c):
        res = _read_all(bufs["res"], row[COL["w_res"]])
        stash = _read_all(bufs["stash"], row[COL["w_stash"]])
        grads = st.stack.weight_grad(st.params, c * n, res, st.consts(row[COL["w_micro"]]),
                                     stash, acc["grads"])
        return dict(acc, grads=grads), out

    def branch(ops):
        def run(bufs, acc, row):
            out = nothing
            kinds = dict(ops)
            if set(kinds) == {"F", "BW"}:
                return do_pair(bufs, acc, out, row, kinds["F"], kinds["BW"])
            for kind, c in ops:
                acc, out = {"F": do_f, "BW": do_bw, "B": do_b, "W": do_w}[kind](bufs, acc, out,
                                                                             row, c)
            return acc, out
        return run

    branches = [branch(ops) for ops in prog.branches]
    down = [(j, j + 1) for j in range(P - 1)]
    up = [(j + 1, j) for j in range(P - 1)]

    def tick(carry, rows):
        bufs, acc = carry
        row = rows[stage]
        acc, out = jax.lax.switch(row[COL["branch"]], branches, bufs, acc, row)
        first = jnp.where(row[COL["b_first"]] > 0, row[COL["b_micro"]], -1)
        bufs = dict(bufs, res=_write_all(bufs["res"], row[COL["f_res"]], out["res"]),
                    post_res=_write_all(bufs["post_res"], row[COL["f_post"]], out["post_res"]),
                    stash=_write_all(bufs["stash"], row[COL["b_stash"]], out["stash"]),
                    dxs=_write(bufs["dxs"], first, out["grad"]))
        act, grad = bufs["act"], bufs["grad"]
        for kind, way in sorted(prog.channels):
            msg = jax.lax.ppermute(out[kind], AXIS, down if way == "down" else up)
            slot = row[COL[f"recv_{kind}_{way}"]]
            if kind == "act":
                act = _write(act, slot, msg)
            else:
                grad = _write(grad, slot, msg)
        act = _write(act, row[COL["local_act"]], out["act"])
        grad = _write(grad, row[COL["local_grad"]], out["grad"])
        return (dict(bufs, act=act, grad=grad), acc), None

    (bufs, acc), _ = jax.lax.scan(tick, (bufs, acc), jnp.asarray(prog.table))
    return dict(acc, dxs=bufs["dxs"])
