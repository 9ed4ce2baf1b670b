"""Explicit reverse-mode differentiation of a stage, in pieces a pipeline schedule can order.

`jax.vjp` (jax 0.12's VJP object) returns the residuals of a forward pass as a pytree; the
pieces here store them in the executor's slot buffers at F and rebuild the VJP at the
backward. Parameters are never stored (`saveable_args=False`: they are the stage's own, at
hand when the backward runs), nor the per-micro-batch constants (rotary tables, segment ids:
the executor reads them again); only what the layers computed from the micro-batch.

- `LayerStack`: a chunk of identical layers, one `jax.vjp` per layer inside a `lax.scan`
  over the layers. The backward is the reverse scan, adding each layer's weight gradients
  into the stage's accumulator at that layer's index (an in-place update of the carry): a
  backward never holds more than one layer's weight gradients besides the accumulator, as
  autodiff of a layer scan would (a whole-chunk VJP produced the chunk's gradients at once
  and cost a second fp32 copy of them: SCALE.md). `input_grad` / `weight_grad` are the B and
  W halves of a split backward (sharding/backward_split.py splits one layer's backward).
- `Vjp`: one function differentiated whole (the loss head on the last virtual stage).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax._src.api import NotNeeded, NotSaveable  # jax.vjp's sentinels (the VJP object of jax 0.12)

from sharding.backward_split import SplitBackward


def _is_sentinel(x) -> bool:
    return isinstance(x, (NotSaveable, NotNeeded))


def _restore(mirror, values):
    """`values` where the VJP's saved-arguments mirror holds NotSaveable."""
    saved, tree = jax.tree.flatten(mirror, is_leaf=_is_sentinel)
    given = jax.tree.leaves(values)
    assert len(saved) == len(given), (len(saved), len(given))
    return jax.tree.unflatten(tree, [v if isinstance(s, NotSaveable) else s
                                     for s, v in zip(saved, given)])


class _Residuals:
    """Flatten a VJP object to its stored leaves and back (the first trace fixes the tree)."""

    treedef = None
    avals = None

    def leaves(self, vjp) -> list:
        leaves, treedef = jax.tree.flatten(vjp)
        shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in leaves]
        if self.treedef is None:
            self.treedef, self.avals = treedef, shapes
        elif [(a.shape, a.dtype) for a in shapes] != [(a.shape, a.dtype) for a in self.avals]:
            raise AssertionError(f"a stage's residuals changed between traces: {self.avals} "
                                 f"then {shapes}")
        return leaves

    def vjp(self, leaves, *args):
        """The VJP from stored leaves, its unsaved arguments restored from `args` (None: the
        argument was saved)."""
        vjp = jax.tree.unflatten(self.treedef, leaves)
        mirror = list(vjp.args_res)
        for k, a in enumerate(args):
            if a is not None:
                mirror[k] = _restore(mirror[k], a)
        return vjp.replace(args_res=mirror)


@dataclasses.dataclass
class Vjp(_Residuals):
    """`fun(params, x) -> (out, aux)` differentiated whole."""

    def forward(self, fun: Callable, params, x):
        out, vjp, aux = jax.vjp(fun, params, x, has_aux=True, saveable_args=(False, True))
        return out, aux, self.leaves(vjp)

    def backward(self, params, leaves, ct):
        """(d params, d x)."""
        return self.vjp(leaves, params, None)(ct)


def _at(v, k):
    return jax.lax.dynamic_index_in_dim(v, k, keepdims=False)


def _add_at(acc, k, d):
    return [jax.lax.dynamic_update_index_in_dim(a, _at(a, k) + g.astype(a.dtype), k, 0)
            for a, g in zip(acc, d)]


@dataclasses.dataclass
class LayerStack(_Residuals):
    """`n` layers `layer(params_l, x, consts) -> ((x', balance_l), aux_l)`; parameters as
    leaves [chunks * n, ...] (a chunk starts at layer index `base`)."""

    layer: Callable
    n: int
    split: SplitBackward | None = None

    def forward(self, params, base: int, x, consts):
        """((y, balance [n]), aux [n], residual leaves [n, ...])."""
        def body(x, l):
            p = [_at(v, base + l) for v in params]
            (y, bal), vjp, aux = jax.vjp(self.layer, p, x, consts, has_aux=True,
                                         saveable_args=(False, True, False),
                                         in_nzs=(True, True, False))
            return y.astype(x.dtype), (bal, aux, self.leaves(vjp))

        y, (bal, aux, res) = jax.lax.scan(body, x, jnp.arange(self.n))
        return (y, bal), aux, res

    def _layer_vjp(self, params, base, res, consts, l):
        return self.vjp([_at(v, l) for v in res], [_at(v, base + l) for v in params], None,
                        consts)

    def backward(self, params, base: int, res, consts, ct, ct_balance, acc):
        """(d x, acc + d params): the layers in reverse, each one's gradients added at once."""
        def body(carry, l):
            dy, acc = carry
            d_params, dx, _ = self._layer_vjp(params, base, res, consts, l)((dy, ct_balance))
            return (dx.astype(dy.dtype), _add_at(acc, base + l, d_params)), None

        (dx, acc), _ = jax.lax.scan(body, (ct, acc), jnp.arange(self.n), reverse=True)
        return dx, acc

    def forward_backward(self, params, f_base: int, x, f_consts, b_base: int, res, b_consts,
                         ct, ct_balance, acc):
        """An F&B pair in one layer loop: iteration l runs the forward of layer l of one chunk
        and the backward of layer n - 1 - l of the other. The two are independent, so the
        compiler may overlap one's expert all-to-all with the other's matmuls (DualPipe's
        overlapped forward-backward); two loops in a row could not. Returns forward's
        ((y, balance), aux, residuals) and backward's (d x, acc)."""
        n = self.n

        def body(carry, l):
            x, dy, acc = carry
            p = [_at(v, f_base + l) for v in params]
            (y, bal), vjp, aux = jax.vjp(self.layer, p, x, f_consts, has_aux=True,
                                         saveable_args=(False, True, False),
                                         in_nzs=(True, True, False))
            k = n - 1 - l
            d_params, dx, _ = self._layer_vjp(params, b_base, res, b_consts, k)((dy, ct_balance))
            acc = _add_at(acc, b_base + k, d_params)
            return (y.astype(x.dtype), dx.astype(dy.dtype), acc), (bal, aux, self.leaves(vjp))

        (y, dx, acc), (bal, aux, res_f) = jax.lax.scan(body, (x, ct, acc), jnp.arange(n))
        return ((y, bal), aux, res_f), (dx, acc)

    def build_split(self, params, x, consts, ct_balance) -> None:
        """Trace one layer's backward and split it (call after a forward has been traced)."""
        p = [jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for v in params]

        def bwd(p, r, c, ct):
            d_params, dx, _ = self.vjp(r, p, None, c)(ct)
            return d_params, dx
        self.split = SplitBackward()
        self.split.build(bwd, p, self.avals, consts, (x, ct_balance))

    def input_grad(self, params, base: int, res, consts, ct, ct_balance):
        """B: (d x, stash [n, ...]), the layers in reverse."""
        def body(dy, l):
            r = [_at(v, l) for v in res]
            dx, stash = self.split.input_grad([_at(v, base + l) for v in params], r, consts,
                                              (dy, ct_balance))
            return dx.astype(dy.dtype), stash

        return jax.lax.scan(body, ct, jnp.arange(self.n), reverse=True)

    def weight_grad(self, params, base: int, res, consts, stash, acc):
        """W: acc + d params from the residuals and B's stash."""
        def body(acc, l):
            d = self.split.weight_grad([_at(v, base + l) for v in params],
                                       [_at(v, l) for v in res], consts, [_at(v, l) for v in stash])
            return _add_at(acc, base + l, d), None

        acc, _ = jax.lax.scan(body, acc, jnp.arange(self.n))
        return acc
