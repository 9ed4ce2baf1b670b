"""Block-scaled FP8 matmul in the DeepSeek-V3 recipe (SPEC section 7).

`fp8_matmul(x, w)` computes `x @ w` with both operands in float8_e4m3fn: activations scaled
per 1 x 128 tile along the contraction dim, weights per 128 x 128 block, each K-block's
partial product accumulated in fp32 and multiplied by its two scales before it is added (the
"promote every 128 of K" rule). The custom VJP runs the backward matmuls in e4m3 too:
dgrad = dy @ w^T with dy in 1 x 128 tiles along N and the same weight blocks transposed;
wgrad = x^T @ dy with both in 128-token tiles. Casting to float8 in JAX does not saturate, so
every cast is preceded by a clip to +-448.

`w` may also be a `QuantizedWeight` (e4m3 values + fp32 block scales, e.g. straight from an
official FP8 checkpoint): it is used as stored, with no bf16 copy and no weight gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
_MIN_AMAX = 1e-4  # s = max(amax, 1e-4) / 448: an all-zero tile gets a finite scale
# Gradients get a floor of their own: with a mean-over-tokens loss at millions of tokens per
# step, a gradient tile's amax is far below 1e-4, and the activations' floor would quantize it
# toward zero (42% error at 3e-10). 2^-100 keeps every scale a normal fp32 number (and x / s
# <= 448), so the floor only ever applies to all-zero tiles.
_MIN_AMAX_GRAD = 2.0**-100


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A [K, N] weight as e4m3 values and one fp32 scale per (block_k x block_n) block."""

    q: jax.Array       # float8_e4m3fn [K, N]
    scale: jax.Array   # float32 [ceil(K / block_k), ceil(N / block_n)]; W = q * scale[block]
    block: tuple[int, int] = (BLOCK, BLOCK)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def __getitem__(self, index):
        """`param[...]` on a parameter holding a QuantizedWeight returns it whole."""
        if index is Ellipsis:
            return self
        raise TypeError("a QuantizedWeight is only indexed as a whole (w[...])")

    def dequantize(self) -> jax.Array:
        """fp32 [K, N] (for tests and fallbacks)."""
        k, n = self.q.shape
        s = jnp.repeat(jnp.repeat(self.scale, self.block[0], 0), self.block[1], 1)[:k, :n]
        return self.q.astype(jnp.float32) * s

    @classmethod
    def from_checkpoint(cls, q_out_in: jax.Array, scale_inv: jax.Array,
                        block: tuple[int, int] = (BLOCK, BLOCK)) -> "QuantizedWeight":
        """From the HF layout: e4m3 [out, in] and `weight_scale_inv` [out / b0, in / b1]."""
        return cls(q=q_out_in.T, scale=scale_inv.astype(jnp.float32).T, block=(block[1], block[0]))


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale"], meta_fields=["block"])


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _cast_e4m3(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_tiles(x: Float[Array, "m k"], tile: int = BLOCK, floor: float = _MIN_AMAX):
    """Per-row 1 x `tile` quantization along the last axis (K padded to a multiple of `tile`).

    Returns (q [m, Kp] e4m3, scale [m, Kp / tile] fp32) with x ~= q * scale[tile]; `floor`
    bounds the amax from below (activations 1e-4 as in DeepSeek's kernel, gradients 2^-100)."""
    x = _pad_to(x.astype(jnp.float32), 1, tile)
    m, k = x.shape
    t = x.reshape(m, k // tile, tile)
    scale = jnp.maximum(jnp.max(jnp.abs(t), axis=-1), floor) / E4M3_MAX
    return _cast_e4m3(t / scale[..., None]).reshape(m, k), scale


def quantize_weight(w: Float[Array, "k n"], block: tuple[int, int] = (BLOCK, BLOCK)) -> QuantizedWeight:
    """Per-block quantization of a [K, N] weight (partial edge blocks allowed)."""
    k, n = w.shape
    wp = _pad_to(_pad_to(w.astype(jnp.float32), 0, block[0]), 1, block[1])
    kb, nb = wp.shape[0] // block[0], wp.shape[1] // block[1]
    blocks = wp.reshape(kb, block[0], nb, block[1])
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(1, 3)), _MIN_AMAX) / E4M3_MAX
    q = _cast_e4m3(blocks / scale[:, None, :, None]).reshape(wp.shape)[:k, :n]
    return QuantizedWeight(q=q, scale=scale, block=block)


def _scaled_dot(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array, tile: int) -> jax.Array:
    """sum over K-blocks i of (qa[:, i] @ qb[i]) * sa[:, i] * sb[i]: fp32 [m, n].

    qa [m, K] e4m3, sa [m, K/tile]; qb [K, n] e4m3, sb [K/tile, n] (per column within a block).
    Each block's product is an fp32-accumulated float8 dot; scales apply before the sum."""
    m, k = qa.shape
    n = qb.shape[1]
    kb = k // tile
    a = qa.reshape(m, kb, tile).transpose(1, 0, 2)
    b = qb.reshape(kb, tile, n)

    def block(ai, bi, sai, sbi):
        return jax.lax.dot(ai, bi, preferred_element_type=jnp.float32) * sai[:, None] * sbi[None, :]

    def body(acc, args):
        return acc + block(*args), None

    # The first block's product starts the sum: inside shard_map it varies over the mesh axes
    # of both operands, which a jnp.zeros carry would not (scan needs equal carry types).
    blocks = (a, b, sa.T, sb)
    acc = block(*(x[0] for x in blocks))
    if kb > 1:
        acc, _ = jax.lax.scan(body, acc, tuple(x[1:] for x in blocks))
    return acc


def _expand_cols(scale: jax.Array, block_n: int, n: int) -> jax.Array:
    """[kb, nb] block scales -> [kb, n] per-column scales."""
    return jnp.repeat(scale, block_n, axis=1)[:, :n]


def _forward(x2: jax.Array, qw: QuantizedWeight) -> jax.Array:
    k, n = qw.shape
    tk, tn = qw.block
    qx, sx = quantize_tiles(x2, tk)
    qwp = _pad_to(qw.q, 0, tk)
    return _scaled_dot(qx, sx, qwp, _expand_cols(qw.scale, tn, n), tk)


def _dgrad(dy2: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """dy @ w^T: dy in 1 x block_n tiles along N, the weight's blocks transposed."""
    k, n = qw.shape
    tk, tn = qw.block
    qdy, sdy = quantize_tiles(dy2, tn, _MIN_AMAX_GRAD)
    qwt = _pad_to(qw.q.T, 0, tn)
    return _scaled_dot(qdy, sdy, qwt, _expand_cols(qw.scale.T, tk, k), tn)


def _wgrad(x2: jax.Array, dy2: jax.Array, tile: int = BLOCK) -> jax.Array:
    """x^T @ dy: both in `tile`-token tiles (1 x tile tiles of x^T and of dy^T)."""
    qxt, sxt = quantize_tiles(x2.T, tile)     # [k, Mp], [k, Mb]
    qdyt, sdyt = quantize_tiles(dy2.T, tile, _MIN_AMAX_GRAD)  # [n, Mp], [n, Mb]
    return _scaled_dot(qxt, sxt, qdyt.T, sdyt.T, tile)


# The three e4m3 products, for callers that arrange their own operands (grouped experts).
fp8_forward, fp8_dgrad, fp8_wgrad = _forward, _dgrad, _wgrad


@jax.custom_vjp
def _fp8_dense(x2, w):
    return _forward(x2, quantize_weight(w)).astype(x2.dtype)


def _fp8_dense_fwd(x2, w):
    return _fp8_dense(x2, w), (x2, w)


def _fp8_dense_bwd(res, dy):
    x2, w = res
    dx = _dgrad(dy, quantize_weight(w)).astype(x2.dtype)
    return dx, _wgrad(x2, dy).astype(w.dtype)


_fp8_dense.defvjp(_fp8_dense_fwd, _fp8_dense_bwd)


@jax.custom_vjp
def _fp8_dense_quantized(x2, qw: QuantizedWeight):
    return _forward(x2, qw).astype(x2.dtype)


def _fp8_dense_quantized_fwd(x2, qw):
    return _fp8_dense_quantized(x2, qw), (x2, qw)


def _fp8_dense_quantized_bwd(res, dy):
    x2, qw = res
    zero_w = jax.tree.map(jnp.zeros_like, qw)  # stored FP8 weights are frozen
    return _dgrad(dy, qw).astype(x2.dtype), zero_w


_fp8_dense_quantized.defvjp(_fp8_dense_quantized_fwd, _fp8_dense_quantized_bwd)


def fp8_matmul(x: Float[Array, "... k"], w: Float[Array, "k n"] | QuantizedWeight
               ) -> Float[Array, "... n"]:
    """`x @ w` through e4m3 with DeepSeek's tile / block scaling; returns x's dtype."""
    k = w.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"fp8_matmul: x has {x.shape[-1]} input features, w has {k} rows")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if isinstance(w, QuantizedWeight):
        y = _fp8_dense_quantized(x2, w)
    else:
        y = _fp8_dense(x2, w)
    return y.reshape(*lead, w.shape[1])


def reference_matmul(x, w, dtype):
    """The same product in `dtype` operands with fp32 accumulation (bf16 fallback, baselines)."""
    if isinstance(w, QuantizedWeight):
        w = w.dequantize()
    out = jnp.einsum("...k,kn->...n", x.astype(dtype), w.astype(dtype),
                     preferred_element_type=jnp.float32)
    return out.astype(x.dtype)

