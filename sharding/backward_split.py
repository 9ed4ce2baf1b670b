"""A stage's backward pass split in two: B (input gradient) now, W (weight gradients) later.

Zero-bubble schedules (zb, dualpipev) run the input-gradient half of a micro-batch's backward
as soon as its output gradient arrives, because the previous stage waits for it, and defer the
weight-gradient half to fill idle slots. Here the split is made on the backward program
itself: the stage's VJP (`ChunkCalculus.backward`) is traced once to a jaxpr taking (params,
residuals, output gradients) to (weight gradients, input gradient), and its equations are
partitioned by what they feed:
- B: every equation the input gradient needs (the chain of activation gradients back
  through the layers, with whatever those equations also compute);
- W: the equations only the weight gradients need (for a matmul y = x w, its dw = x^T dy);
- the stash: the values B computes that W reads (each such matmul's output gradient dy),
  kept from B to W in a buffer like the residuals (sharding/schedule_program.py's "stash").
Both halves evaluate the original equations (`jax.core.eval_jaxpr`), so B then W computes the
same numbers as the whole backward. The granularity is the jaxpr's top level: the stage's
layers must be unrolled (a layer scan's backward is one equation, which then lands in B
whole), and an equation that feeds both (e.g. the expert-parallel shard_map, whose backward
computes the routed experts' weight and input gradients together) stays in B. `flops()`
reports how much of the backward's matmul work each half got.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.extend.core import Literal, Var


def _vars(atoms) -> list:
    return [a for a in atoms if isinstance(a, Var) and not isinstance(a, Literal)]


def _needed(eqns, targets) -> set[int]:
    """Indices of the equations the target variables depend on (effects kept)."""
    need = set(_vars(targets))
    keep = set()
    for k in range(len(eqns) - 1, -1, -1):
        e = eqns[k]
        if e.effects or any(o in need for o in e.outvars):
            keep.add(k)
            need.update(_vars(e.invars))
    return keep


@dataclasses.dataclass
class SplitBackward:
    """B / W halves of a backward `fn(params, residuals, consts, ct) -> (d params, d x)`;
    `build` with the arguments' shapes first (inside the shard_map, where the stage runs)."""

    stash_avals: list | None = None

    def build(self, fn, params, res, consts, ct) -> None:
        closed = jax.make_jaxpr(fn)(params, res, consts, ct)
        jaxpr, self._consts = closed.jaxpr, closed.consts
        self._params_tree = jax.tree.structure(params)
        n_p = self._params_tree.num_leaves
        n_in = n_p + len(res) + len(jax.tree.leaves(consts))
        eqns = jaxpr.eqns
        w_outs, x_outs = jaxpr.outvars[:n_p], jaxpr.outvars[n_p:]
        b_idx = _needed(eqns, x_outs)
        w_idx = _needed(eqns, w_outs) - b_idx
        read_by_w = set(_vars(w_outs)) | {v for k in w_idx for v in _vars(eqns[k].invars)}
        # what W reads besides the parameters, residuals and constants: the output gradients
        # and values B computed
        stash = [v for v in jaxpr.invars[n_in:] if v in read_by_w]
        stash += [v for k in sorted(b_idx) for v in eqns[k].outvars if v in read_by_w]
        self._b = jaxpr.replace(eqns=[eqns[k] for k in sorted(b_idx)], outvars=[*x_outs, *stash])
        self._w = jaxpr.replace(invars=[*jaxpr.invars[:n_in], *stash],
                                eqns=[eqns[k] for k in sorted(w_idx)], outvars=list(w_outs))
        self.stash_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in stash]
        self._eqns = (eqns, b_idx, w_idx)

    def input_grad(self, params, res, consts, ct):
        """B: (d x, stash)."""
        outs = jax.core.eval_jaxpr(self._b, self._consts, *jax.tree.leaves(params), *res,
                                   *jax.tree.leaves(consts), *jax.tree.leaves(ct))
        return outs[0], outs[1:]

    def weight_grad(self, params, res, consts, stash):
        """W: d params, from the residuals and B's stash."""
        outs = jax.core.eval_jaxpr(self._w, self._consts, *jax.tree.leaves(params), *res,
                                   *jax.tree.leaves(consts), *stash)
        return jax.tree.unflatten(self._params_tree, outs)

    def flops(self) -> dict:
        """Matmul FLOPs of the backward by half (nested programs counted once per call)."""
        eqns, b_idx, w_idx = self._eqns
        return {"B": sum(_dot_flops(eqns[k]) for k in b_idx),
                "W": sum(_dot_flops(eqns[k]) for k in w_idx)}


def _dot_flops(eqn) -> float:
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        a, out = eqn.invars[0].aval, eqn.outvars[0].aval
        return 2.0 * float(np.prod(out.shape)) * float(np.prod([a.shape[d] for d in lc]))
    total = 0.0
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += sum(_dot_flops(e) for e in sub.eqns)
    return total
