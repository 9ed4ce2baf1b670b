"""Run a schedule's program (sharding/schedule_program.py) inside the shard_map over the stages.

One `lax.scan` over the ticks; at each tick every stage looks up its row of the table (by
`axis_index`) and runs one `lax.switch` branch: idle, an F, a backward (BW, or its B half),
a W, or an F&B pair. Then activations go to the next stage and gradients to the previous one
with `ppermute` (every tick, a fixed set of channels; a stage stores what it receives into
the inbox slot its row names, or drops it). A scan rather than ticks unrolled in Python: the
body, and so the compile time, does not grow with the micro-batches or stages (the table is
data, [ticks, stages, fields] int32); only the distinct branches are traced.

Differentiation is explicit, per stage and micro-batch (`ChunkCalculus`): F runs `jax.vjp`
of the stage's layers and stores the residuals in a fixed-size buffer (as many slots as the
schedule keeps micro-batches in flight: P for 1F1B, M for GPipe); the backward rebuilds the
VJP from a slot and the stage's current parameters (never stored: `saveable_args`), and adds
the weight gradients to a per-stage accumulator. No autodiff runs through the tick loop, so
nothing holds every tick's residuals. A split backward (zb, dualpipev) runs the input-
gradient half in B and the weight-gradient half in W (sharding/backward_split.py).
The last virtual stage's F also runs the loss head (`post`): norm, MTP, chunked cross
entropy, whose backward starts the stage's backward from d(loss) = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax._src.api import NotNeeded, NotSaveable  # jax.vjp's sentinels (jax 0.12's VJP object)

from sharding.schedule_program import COL, Program

AXIS = "pipeline"


def _is_sentinel(x) -> bool:
    return isinstance(x, (NotSaveable, NotNeeded))


@dataclasses.dataclass
class ChunkCalculus:
    """A function `fun(params, x) -> (out, aux)` differentiated in pieces: `forward` returns
    the residual leaves to store, `backward` rebuilds the VJP from them and the parameters.
    `params` are never saved (they are the stage's own, at hand at the backward). Every
    `fun` passed (one per micro-batch: they close over its data) must trace alike: the first
    trace fixes the residuals' structure."""

    treedef: object = None
    avals: list | None = None
    split: object = None    # backward_split.SplitBackward, for B / W halves

    def forward(self, fun, params, x):
        out, vjp, aux = jax.vjp(fun, params, x, has_aux=True, saveable_args=(False, True))
        leaves, treedef = jax.tree.flatten(vjp)
        if self.treedef is None:
            self.treedef = treedef
            self.avals = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in leaves]
        elif [(v.shape, v.dtype) for v in leaves] != [(a.shape, a.dtype) for a in self.avals]:
            raise AssertionError("a stage's residuals changed between traces")
        return out, aux, leaves

    def vjp(self, params, leaves):
        vjp = jax.tree.unflatten(self.treedef, leaves)
        args = list(vjp.args_res)  # mirrors (params, x), containers as tuples
        saved, tree = jax.tree.flatten(args[0], is_leaf=_is_sentinel)
        given = jax.tree.leaves(params)
        assert len(saved) == len(given), (len(saved), len(given))
        args[0] = jax.tree.unflatten(tree, [p if isinstance(r, NotSaveable) else r
                                            for r, p in zip(saved, given)])
        return vjp.replace(args_res=args)

    def backward(self, params, leaves, ct):
        """(d params, d x)."""
        return self.vjp(params, leaves)(ct)


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


def _add_at(trees, c, values):
    return jax.tree.map(lambda a, v: a.at[c].add(v.astype(a.dtype)), trees, values)


@dataclasses.dataclass
class StageSetup:
    """What the executor needs besides the program: the chunk and loss calculi, the stage's
    parameters ([chunks, layers, ...] leaves), the loss head's, the micro-batch inputs and
    the per-micro-batch data of the layers (`layer_data(i)`) and of the loss (`post_data(i)`)."""

    chunk: ChunkCalculus
    post: ChunkCalculus
    make_chunk: Callable   # i -> fun(params, x) -> ((y, balance), {"expert_counts", "dropped"})
    make_post: Callable    # i -> fun(post_params, y) -> (loss, aux)
    params: list                    # [chunks, layers, ...] leaves
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
    chunk_params = [[v[c] for v in st.params] for c in range(chunks)]
    x0 = jnp.zeros(act_shape, act_dtype)

    # shapes of residuals, outputs and aux: one abstract trace each (also fixes the treedefs)
    def probe_chunk():
        return st.chunk.forward(st.make_chunk(0), chunk_params[0], x0)

    (_, bal_s), aux_s, res_s = jax.eval_shape(probe_chunk)

    def probe_post():
        return st.post.forward(st.make_post(0), st.post_params, x0)

    loss_s, post_aux_s, post_res_s = jax.eval_shape(probe_post)
    zeros = lambda s, n=None: jnp.zeros(s.shape if n is None else (n, *s.shape), s.dtype)  # noqa: E731
    carry = dict(
        res=[zeros(s, prog.slots["res"]) for s in res_s],
        post_res=[zeros(s, prog.slots["post"]) for s in post_res_s],
        act=jnp.zeros((prog.slots["act"], *act_shape), act_dtype),
        grad=jnp.zeros((prog.slots["grad"], *act_shape), act_dtype),
        grads=[jnp.zeros_like(v) for v in st.params],
        post_grads=jax.tree.map(jnp.zeros_like, st.post_params),
        dxs=jnp.zeros(st.xs.shape, act_dtype),
        loss=jnp.zeros((), jnp.float32),
        aux={k: jnp.zeros((chunks, *v.shape), v.dtype) for k, v in aux_s.items()}
        | {"balance": jnp.zeros((chunks, *bal_s.shape), bal_s.dtype)},
        post_aux=jax.tree.map(zeros, post_aux_s),
    )
    if prog.schedule.split_backward:
        split = st.chunk.split
        carry["stash"] = [zeros(s, prog.slots["stash"]) for s in split.stash_avals]
    ct_balance = jnp.full(bal_s.shape, st.balance_ct, bal_s.dtype)

    def do_f(carry, row, c, loss):
        i, inn = row[COL["f_micro"]], row[COL["f_in"]]
        x = jnp.where(inn < 0, st.xs[i].astype(act_dtype), carry["act"][jnp.maximum(inn, 0)])
        (y, bal), aux, res = st.chunk.forward(st.make_chunk(i), chunk_params[c], x)
        carry = dict(carry, res=_write_all(carry["res"], row[COL["f_res"]], res))
        new_aux = dict(aux, balance=bal)
        carry["aux"] = {k: carry["aux"][k].at[c].add(new_aux[k]) for k in carry["aux"]}
        carry["loss"] = carry["loss"] + st.balance_ct * jnp.sum(bal)
        if loss:
            lp, post_aux, post_res = st.post.forward(st.make_post(i), st.post_params, y)
            carry["post_res"] = _write_all(carry["post_res"], row[COL["f_post"]], post_res)
            carry["loss"] = carry["loss"] + lp
            carry["post_aux"] = jax.tree.map(jnp.add, carry["post_aux"], post_aux)
        return carry, y

    def ct_of(carry, row, loss):
        """The gradient arriving at a backward's outputs: from the loss head on the last
        virtual stage (whose gradients are added here), else from the inbox."""
        if not loss:
            return carry, carry["grad"][jnp.maximum(row[COL["b_ct"]], 0)]
        res = _read_all(carry["post_res"], row[COL["b_post"]])
        d_post, dy = st.post.backward(st.post_params, res, jnp.ones((), loss_s.dtype))
        carry = dict(carry, post_grads=jax.tree.map(lambda a, d: a + d.astype(a.dtype),
                                                    carry["post_grads"], d_post))
        return carry, dy

    def put_dx(carry, row, dx):
        i = row[COL["b_micro"]]
        first = row[COL["b_first"]] > 0
        dxs = carry["dxs"]
        return dict(carry, dxs=dxs.at[i].set(jnp.where(first, dx.astype(dxs.dtype), dxs[i])))

    def do_bw(carry, row, c, loss):
        carry, dy = ct_of(carry, row, loss)
        res = _read_all(carry["res"], row[COL["b_res"]])
        d_params, dx = st.chunk.backward(chunk_params[c], res, (dy.astype(act_dtype), ct_balance))
        carry = dict(carry, grads=_add_at(carry["grads"], c, d_params))
        return put_dx(carry, row, dx), dx

    def do_b(carry, row, c, loss):
        carry, dy = ct_of(carry, row, loss)
        res = _read_all(carry["res"], row[COL["b_res"]])
        dx, stash = st.chunk.split.input_grad(chunk_params[c], res,
                                               (dy.astype(act_dtype), ct_balance))
        carry = dict(carry, stash=_write_all(carry["stash"], row[COL["b_stash"]], stash))
        return put_dx(carry, row, dx), dx

    def do_w(carry, row, c):
        res = _read_all(carry["res"], row[COL["w_res"]])
        stash = _read_all(carry["stash"], row[COL["w_stash"]])
        d_params = st.chunk.split.weight_grad(chunk_params[c], res, stash)
        return dict(carry, grads=_add_at(carry["grads"], c, d_params))

    def branch(ops):
        def run(carry, row):
            out_act, out_grad = x0, x0
            for kind, c, loss in ops:
                if kind == "F":
                    carry, y = do_f(carry, row, c, loss)
                    out_act = y.astype(act_dtype)
                elif kind == "BW":
                    carry, out_grad = do_bw(carry, row, c, loss)
                elif kind == "B":
                    carry, out_grad = do_b(carry, row, c, loss)
                else:
                    carry = do_w(carry, row, c)
            return carry, out_act, out_grad.astype(act_dtype)
        return run

    branches = [branch(ops) for ops in prog.branches]
    down = [(j, j + 1) for j in range(P - 1)]
    up = [(j + 1, j) for j in range(P - 1)]

    def tick(carry, rows):
        row = rows[stage]
        carry, out_act, out_grad = jax.lax.switch(row[COL["branch"]], branches, carry, row)
        act, grad = carry["act"], carry["grad"]
        for kind, way in sorted(prog.channels):
            msg = jax.lax.ppermute(out_act if kind == "act" else out_grad, AXIS,
                                   down if way == "down" else up)
            slot = row[COL[f"recv_{kind}_{way}"]]
            if kind == "act":
                act = _write(act, slot, msg)
            else:
                grad = _write(grad, slot, msg)
        act = _write(act, row[COL["local_act"]], out_act)
        grad = _write(grad, row[COL["local_grad"]], out_grad)
        return dict(carry, act=act, grad=grad), None

    carry, _ = jax.lax.scan(tick, carry, jnp.asarray(prog.table))
    return carry
