"""A stage's backward pass split in two: B (input gradient) now, W (weight gradients) later.

Zero-bubble schedules (zb, dualpipev) run the input-gradient half of a micro-batch's backward
as soon as its output gradient arrives, because the previous stage waits for it, and defer the
weight-gradient half to fill idle slots. The split is made on the backward program itself: one
layer's VJP (sharding/stage_calculus.py) is traced once to a jaxpr taking (params, residuals,
constants, output gradients) to (weight gradients, input gradient), and its equations are
partitioned by what they feed:
- B: every equation the input gradient needs (the chain of activation gradients back through
  the layer, with whatever those equations also compute);
- W: the equations only the weight gradients need (for a matmul y = x w, its dw = x^T dy);
- the stash: the values B computes that W reads (each such matmul's output gradient dy), kept
  from B to W in a buffer like the residuals (sharding/schedule_program.py's "stash").
A `shard_map` that feeds both halves (the expert-parallel dispatch, whose backward computes
the routed experts' input and weight gradients) is split the same way inside: two shard_maps,
B's handing the values its W reads out stacked over the manual axes (one block per device).
Other equations that feed both (a loop, a jit call) stay whole in B. Both halves evaluate the
original equations, so B then W computes the same numbers as the whole backward; `flops()`
reports how much of the backward's matmul work each half got.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax._src import source_info_util  # to bind equations as jax.core.eval_jaxpr does
from jax.extend.core import Literal, Var
from jax.sharding import PartitionSpec as P


def _vars(atoms) -> list:
    return [a for a in atoms if isinstance(a, Var) and not isinstance(a, Literal)]


def _needed(eqns, targets) -> tuple[set[int], set]:
    """(indices of the equations the targets depend on (effects kept), the variables read)."""
    need = set(_vars(targets))
    keep = set()
    for k in range(len(eqns) - 1, -1, -1):
        e = eqns[k]
        if e.effects or any(o in need for o in e.outvars):
            keep.add(k)
            need.update(_vars(e.invars))
    return keep, need


class _Key:
    """A value the split creates (a shard_map's stacked stash), keyed by identity."""

    def __init__(self, aval):
        self.aval = aval


def _partition(eqns, x_outs, w_outs):
    """(B items, W items, what W reads that B makes): items are equations or _SplitMap halves."""
    b_idx, b_need = _needed(eqns, x_outs)
    w_idx, _ = _needed(eqns, w_outs)
    x_set, w_set = set(_vars(x_outs)), set(_vars(w_outs))
    b_items, w_items = [], []
    for k, e in enumerate(eqns):
        if k in b_idx and k in w_idx and e.primitive.name == "shard_map":
            b_used = [o in b_need or o in x_set for o in e.outvars]
            later = {v for j in w_idx - b_idx if j > k for v in _vars(eqns[j].invars)}
            w_used = [not bu and (o in later or o in w_set) for o, bu in zip(e.outvars, b_used)]
            split = _SplitMap.make(e, b_used, w_used)
            if split is not None:
                b_items.append(split.b)
                w_items.append(split.w)
                continue
        if k in b_idx:
            b_items.append(e)
        elif k in w_idx:
            w_items.append(e)
    made = {o for it in b_items for o in _outs(it)}
    reads = set(_vars(w_outs)) | {v for it in w_items for v in _ins(it)}
    return b_items, w_items, [v for v in _ordered(made, b_items) if v in reads]


def _outs(item):
    return item.outvars if hasattr(item, "primitive") else item.outs


def _ins(item):
    atoms = item.invars if hasattr(item, "primitive") else item.ins
    return [a for a in atoms if isinstance(a, _Key) or a in _vars([a])]


def _ordered(made, items):
    return [o for it in items for o in _outs(it) if o in made]


@dataclasses.dataclass
class _Half:
    ins: list            # atoms (variables, literals, _Keys)
    outs: list
    run: object          # (values of ins) -> values of outs
    flops: float = 0.0


@dataclasses.dataclass
class _SplitMap:
    b: _Half
    w: _Half

    @staticmethod
    def make(eqn, b_used, w_used):
        body = eqn.params["jaxpr"]
        inner = body.jaxpr if hasattr(body, "jaxpr") and not hasattr(body, "eqns") else body
        consts = getattr(body, "consts", ()) or ()
        outs = inner.outvars
        b_items, w_items, stash = _partition(
            inner.eqns, [o for o, u in zip(outs, b_used) if u], [o for o, u in zip(outs, w_used) if u])
        if not w_items:
            return None
        mesh, axes = eqn.params["mesh"], eqn.params["newly_manual_axes"]
        manual = tuple(a for a in mesh.axis_names if a in axes)
        in_specs, out_specs = tuple(eqn.params["in_specs"]), tuple(eqn.params["out_specs"])
        keys = [_Key(v.aval) for v in stash]
        b_outs = [o for o, u in zip(eqn.outvars, b_used) if u]
        w_outs = [o for o, u in zip(eqn.outvars, w_used) if u]
        invars = list(inner.constvars) + list(inner.invars)

        def body_b(*args):
            env = dict(zip(invars, [*consts, *args]))
            _run(b_items, env)
            got = [_read(env, o) for o, u in zip(outs, b_used) if u]
            return (*got, *[_read(env, v)[None] for v in stash])

        def body_w(*args):
            n = len(eqn.invars)
            env = dict(zip(invars, [*consts, *args[:n]]))
            env.update(zip(stash, [a[0] for a in args[n:]]))
            _run(w_items, env)
            return tuple(_read(env, o) for o, u in zip(outs, w_used) if u)

        sm = dict(mesh=mesh, axis_names=set(axes), check_vma=eqn.params["check_vma"])
        # each stash value stacked over the manual axes it varies over (one block per device
        # group holding a different value), so W sees the same type B made
        stacked = [P(tuple(a for a in manual if a in _varying(v.aval)) or None) for v in stash]
        run_b = jax.shard_map(body_b, in_specs=in_specs, out_specs=(
            *[s for s, u in zip(out_specs, b_used) if u], *stacked), **sm)
        run_w = jax.shard_map(body_w, in_specs=(*in_specs, *stacked), out_specs=tuple(
            s for s, u in zip(out_specs, w_used) if u), **sm)
        ins = list(eqn.invars)
        return _SplitMap(_Half(ins, [*b_outs, *keys], run_b, sum(map(_item_flops, b_items))),
                         _Half(ins + keys, w_outs, run_w, sum(map(_item_flops, w_items))))


def _varying(aval) -> frozenset:
    """The manual mesh axes a value varies over (its type's `mat.varying`, jax 0.12)."""
    mat = getattr(aval, "mat", None)
    return mat.varying if mat is not None else frozenset(getattr(aval, "vma", ()))


def _read(env, v):
    return v.val if isinstance(v, Literal) else env[v]


def _run(items, env) -> None:
    """Evaluate equations and split halves into `env` (as jax.core.eval_jaxpr does)."""
    for it in items:
        if isinstance(it, _Half):
            env.update(zip(it.outs, it.run(*[_read(env, v) for v in it.ins])))
            continue
        params = it.primitive.get_bind_params(it.params)
        with (source_info_util.user_context(it.source_info.traceback,
                                            name_stack=it.source_info.name_stack),
              it.ctx.manager):
            ans = it.primitive.bind(*[_read(env, v) for v in it.invars], **params)
        env.update(zip(it.outvars, ans) if it.primitive.multiple_results else [(it.outvars[0], ans)])


@dataclasses.dataclass
class SplitBackward:
    """B / W halves of a backward `fn(params, residuals, consts, ct) -> (d params, d x)`;
    `build` with the arguments' shapes first (inside the shard_map, where the stage runs)."""

    stash_avals: list | None = None

    def build(self, fn, params, res, consts, ct) -> None:
        closed = jax.make_jaxpr(fn)(params, res, consts, ct)
        jaxpr, self._consts = closed.jaxpr, list(closed.consts)
        self._params_tree = jax.tree.structure(params)
        n_p = self._params_tree.num_leaves
        n_in = n_p + len(res) + len(jax.tree.leaves(consts))
        w_outs, x_outs = jaxpr.outvars[:n_p], jaxpr.outvars[n_p:]
        b_items, w_items, stash = _partition(jaxpr.eqns, x_outs, w_outs)
        w_reads = set(_vars(w_outs)) | {v for it in w_items for v in _ins(it)}
        # the output gradients W reads go to the stash too
        self._stash = [v for v in jaxpr.invars[n_in:] if v in w_reads] + stash
        self._jaxpr, self._n_in = jaxpr, n_in
        self._b, self._w, self._x_outs, self._w_outs = b_items, w_items, x_outs, w_outs
        self.stash_avals = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in jax.eval_shape(
            lambda *a: self.input_grad(*a)[1], params, res, consts, ct)]

    def _env(self, *flat):
        return dict(zip([*self._jaxpr.constvars, *self._jaxpr.invars], [*self._consts, *flat]))

    def input_grad(self, params, res, consts, ct):
        """B: (d x, stash)."""
        env = self._env(*jax.tree.leaves(params), *res, *jax.tree.leaves(consts),
                        *jax.tree.leaves(ct))
        _run(self._b, env)
        return _read(env, self._x_outs[0]), [_read(env, v) for v in self._stash]

    def weight_grad(self, params, res, consts, stash):
        """W: d params, from the residuals and B's stash."""
        env = self._env(*jax.tree.leaves(params), *res, *jax.tree.leaves(consts))
        env.update(zip(self._stash, stash))
        _run(self._w, env)
        return jax.tree.unflatten(self._params_tree, [_read(env, v) for v in self._w_outs])

    def flops(self) -> dict:
        """Matmul FLOPs of the backward by half (loop bodies counted once)."""
        return {"B": sum(_item_flops(i) for i in self._b), "W": sum(_item_flops(i) for i in self._w)}


def _item_flops(item) -> float:
    return item.flops if isinstance(item, _Half) else _dot_flops(item)


def _dot_flops(eqn) -> float:
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        a, out = eqn.invars[0].aval, eqn.outvars[0].aval
        return 2.0 * float(np.prod(out.shape)) * float(np.prod([a.shape[d] for d in lc]))
    total = 0.0
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += sum(_dot_flops(e) for e in sub.eqns)
    return total
