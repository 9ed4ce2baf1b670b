"""The routed experts' SwiGLU, fused per chunk of tiles: one pass over the grouped row buffer.

`expert_ffn` with ours (dsv3_jax/layers/platform_gmm.py: CPU without the BLAS kernel) would run
three grouped matmuls, each its own loop over the tiles of the expert-grouped buffer gathering
its tiles' expert weights (dsv3_jax/layers/grouped_matmul.py), with the [size, width] gate and up
products and their SwiGLU written out and read back in between; the backward pass is six such
loops. Here one loop iteration takes a chunk of tiles through the whole FFN,

    g = x W_gate[e],  u = x W_up[e],  h = silu(g) * u,  y = h W_down[e],

so each chunk's three expert weights are gathered once and no intermediate is written out for
another loop to read; the backward pass is one loop too (dh, the SwiGLU's vjp, dx and the three
weight gradients).
The numerics are those of the three-matmul composition: operands in `dtype`, every product
fp32-accumulated and rounded once (g, u and dh to `dtype`, y to `out_dtype`), the SwiGLU and its
gradient by autodiff of the same expression in `dtype`, weight gradients accumulated in fp32.
The one difference is dx = dg W_gate^T + du W_up^T, summed in fp32 and rounded once (the
composition rounds each term). The forward keeps g and u for the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from dsv3_jax.layers import grouped_matmul as gm

_F32 = jnp.float32


def swiglu(g, u):
    """silu(g) * u, the expression whose autodiff the backward pass uses."""
    return jax.nn.silu(g) * u


def grouped_ffn(x: Float[Array, "size embed"], w_gate: Float[Array, "groups embed width"],
                w_up: Float[Array, "groups embed width"], w_down: Float[Array, "groups width embed"],
                layout: gm.GroupedLayout, dtype, out_dtype=None) -> Float[Array, "size embed"]:
    """SwiGLU of each tile of `x` with its expert's weights, in `dtype` with fp32 accumulation,
    the output in `out_dtype` (default `dtype`)."""
    out_dtype = jnp.dtype(out_dtype or dtype).name
    ops = [x.astype(dtype), w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype)]
    # inside shard_map every operand varies over every operand's axes before the custom VJP:
    # the implicit broadcasts transpose to the psums of dx over tensor shards and of the weight
    # gradients over batch shards (as in grouped_matmul.py)
    ops = [a + gm._zeros_varying_like((), a.dtype, *ops) for a in ops]
    return _ffn(*ops, layout.tile_group, layout.used_tiles, layout.tile, out_dtype)


def _chunk(tiles: int, x, w_gate) -> int:
    (_, d, f) = w_gate.shape
    return gm._chunk_tiles(tiles, 3 * d * f)


def _forward(x, w_gate, w_up, w_down, tile_group, used_tiles, tile, out_dtype, keep: bool):
    """The output [size, embed] and, with `keep`, the gate and up products [tiles, tile, width]."""
    tiles, d, f = x.shape[0] // tile, x.shape[1], w_gate.shape[-1]
    dtype = x.dtype
    xt = x.reshape(tiles, tile, d)

    def fn(carry, start, owned, gs, xs):
        g = jnp.einsum("tmk,tkn->tmn", xs, w_gate[gs], preferred_element_type=_F32).astype(dtype)
        u = jnp.einsum("tmk,tkn->tmn", xs, w_up[gs], preferred_element_type=_F32).astype(dtype)
        y = jnp.einsum("tmk,tkn->tmn", swiglu(g, u), w_down[gs], preferred_element_type=_F32)
        put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v.astype(buf.dtype), start, 0)  # noqa: E731
        return (put(carry[0], y),) + ((put(carry[1], g), put(carry[2], u)) if keep else ())

    like = (w_gate, w_up, w_down, xt, tile_group)
    init = (gm._zeros_varying_like((tiles, tile, d), out_dtype, *like),)
    if keep:
        init += (gm._zeros_varying_like((tiles, tile, f), dtype, *like),) * 2
    out = gm._loop_chunks(fn, tile_group, used_tiles, _chunk(tiles, x, w_gate), init, xt)
    return (out[0].reshape(x.shape[0], d),) + out[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ffn(x, w_gate, w_up, w_down, tile_group, used_tiles, tile, out_dtype):
    return _forward(x, w_gate, w_up, w_down, tile_group, used_tiles, tile, out_dtype, False)[0]


def _ffn_fwd(x, w_gate, w_up, w_down, tile_group, used_tiles, tile, out_dtype):
    y, g, u = _forward(x, w_gate, w_up, w_down, tile_group, used_tiles, tile, out_dtype, True)
    return y, (x, w_gate, w_up, w_down, tile_group, used_tiles, g, u)


def _ffn_bwd(tile, out_dtype, res, dy):
    x, w_gate, w_up, w_down, tile_group, used_tiles, g, u = res
    tiles, (e, d, f) = x.shape[0] // tile, w_gate.shape
    dtype = x.dtype
    xt, dyt = x.reshape(tiles, tile, d), dy.reshape(tiles, tile, d).astype(dtype)

    def fn(carry, start, owned, gs, xs, dys, gc, uc):
        dx, dw_gate, dw_up, dw_down = carry
        h, swiglu_vjp = jax.vjp(swiglu, gc, uc)
        dh = jnp.einsum("tmn,tkn->tmk", dys, w_down[gs], preferred_element_type=_F32).astype(dtype)
        dg, du = swiglu_vjp(dh)
        dxs = (jnp.einsum("tmn,tkn->tmk", dg, w_gate[gs], preferred_element_type=_F32)
               + jnp.einsum("tmn,tkn->tmk", du, w_up[gs], preferred_element_type=_F32))
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dxs.astype(dtype), start, 0)

        def add(dw, a, b):  # dW[e] += a_t^T b_t over the chunk's own tiles (sorted by expert)
            per_tile = gm.tile_weight_grads(a, b)
            return dw.at[gs].add(jnp.where(owned[:, None, None], per_tile, 0), indices_are_sorted=True)

        return dx, add(dw_gate, xs, dg), add(dw_up, xs, du), add(dw_down, h, dys)

    like = (w_gate, xt, dyt, tile_group)
    init = (gm._zeros_varying_like((tiles, tile, d), dtype, *like),
            gm._zeros_varying_like((e, d, f), _F32, *like),
            gm._zeros_varying_like((e, d, f), _F32, *like),
            gm._zeros_varying_like((e, f, d), _F32, *like))
    dx, dw_gate, dw_up, dw_down = gm._loop_chunks(
        fn, tile_group, used_tiles, _chunk(tiles, x, w_gate), init, xt, dyt, g, u)
    return (dx.reshape(x.shape), dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
            dw_down.astype(w_down.dtype), None, None)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
