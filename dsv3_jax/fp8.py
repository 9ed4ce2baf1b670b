"""Block-scaled FP8 matmul in the DeepSeek-V3 recipe (SPEC section 7).

`fp8_matmul(x, w)` computes `x @ w` with both operands in float8_e4m3fn: activations scaled
per 1 x 128 tile along the contraction dim, weights per 128 x 128 block, each K-block's
partial product accumulated in fp32 and multiplied by its two scales before it is added (the
"promote every 128 of K" rule). The custom VJP runs the backward matmuls in e4m3 too:
dgrad = dy @ w^T with dy in 1 x 128 tiles along N and the same weight blocks transposed;
wgrad = x^T @ dy with both in 128-token tiles. Casting to float8 in JAX does not saturate, so
every cast is preceded by a clip to +-448.

Every e4m3 product is `a [m, K] x b [n, K]^T`: both operands K-major (contraction dim minor),
as XLA:GPU's FP8 GEMMs (Triton, cuBLASLt) need them. Weights are therefore held [out, in], the
orientation of the official checkpoint, so a stored weight is never transposed (a [in, out]
weight cost the 671B decode step an 85 GB copy of every e4m3 weight, SCALE.md).

`w` may also be a `QuantizedWeight` (e4m3 values + fp32 block scales, e.g. straight from an
official FP8 checkpoint): it is used as stored, with no bf16 copy and no weight gradient.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sharding.mesh import platform as mesh_platform
from sharding.rules import unsplit

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
_MIN_AMAX = 1e-4  # s = max(amax, 1e-4) / 448: an all-zero tile gets a finite scale
# Gradients get a floor of their own: with a mean-over-tokens loss at millions of tokens per
# step, a gradient tile's amax is far below 1e-4, and the activations' floor would quantize it
# toward zero (42% error at 3e-10). 2^-100 keeps every scale a normal fp32 number (and x / s
# <= 448), so the floor only ever applies to all-zero tiles.
_MIN_AMAX_GRAD = 2.0**-100


def stored_order(dims: tuple, lead: int, n_in: int) -> tuple:
    """Per-dim entries (sizes, logical axes, PartitionSpec parts) of a weight's parameter layout
    [lead..., in..., out...] in its stored FP8 layout [lead..., out..., in...]."""
    dims = tuple(dims)
    return dims[:lead] + dims[lead + n_in:] + dims[lead:lead + n_in]


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A block-quantized weight as FP8 checkpoints store it: e4m3 values `q` [lead..., out...,
    in...] (the checkpoint's [out, in] with the input dims minor-most, the operand layout
    XLA:GPU's FP8 GEMMs read without a copy) and one fp32 scale per block of the [N, K] matrix.

    It stands for the parameter [lead..., in..., out...] (the model's layout, in which its
    logical axes are named): `shape` and `dequantize()` are that parameter's. `lead` dims (layer,
    expert stacks) are those before the scales' last two; the last `n_in` dims of `q` are the
    input."""

    q: jax.Array       # float8_e4m3fn [lead..., out..., in...]
    scale: jax.Array   # float32 [lead..., ceil(N / block[0]), ceil(K / block[1])]
    block: tuple[int, int] = (BLOCK, BLOCK)  # (rows of N, columns of K): HF weight_block_size
    n_in: int = 1

    @property
    def lead(self) -> int:
        return len(self.scale.shape) - 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape [lead..., in..., out...]."""
        lead, n_out = self.lead, len(self.q.shape) - self.lead - self.n_in
        return stored_order(self.q.shape, lead, n_out)

    def __getitem__(self, index):
        """`param[...]` on a parameter holding a QuantizedWeight returns it whole."""
        if index is Ellipsis:
            return self
        raise TypeError("a QuantizedWeight is only indexed as a whole (w[...])")

    def take(self, index) -> "QuantizedWeight":
        """The weight at `index` of the leading (layer, expert) dims, values and scales."""
        return dataclasses.replace(self, q=self.q[index], scale=self.scale[index])

    def flat(self) -> "QuantizedWeight":
        """The same weight with q as the [lead..., N, K] matrix (a reshape, no copy)."""
        lead = self.q.shape[:self.lead]
        k = math.prod(self.q.shape[len(self.q.shape) - self.n_in:])
        return dataclasses.replace(self, q=self.q.reshape(*lead, -1, k), n_in=1)

    def transpose(self) -> "QuantizedWeight":
        """W^T as a weight ([lead..., K, N] values: a copy), for the product dy @ W^T."""
        f = self.flat()
        return QuantizedWeight(jnp.swapaxes(f.q, -1, -2), jnp.swapaxes(f.scale, -1, -2),
                               (self.block[1], self.block[0]))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight in the parameter's layout [lead..., in..., out...] (tests, fallbacks)."""
        return self.dequantize_parts((self.shape[-1],), dtype)[0]

    def dequantize_parts(self, sizes: tuple[int, ...], dtype=jnp.float32) -> tuple[jax.Array, ...]:
        """The weight split along its last output dim into parts of `sizes`, each in `dtype`
        and the parameter's layout (MLA's absorbed W_UK, W_UV). Split in the stored orientation,
        then transposed: XLA:GPU turned a transpose before the split into a transposed e4m3
        copy of the whole layer stack, hoisted out of the layer loop (1 GB of kv_b_proj, 671B)."""
        f = self.flat()
        n, k = f.q.shape[-2:]
        s = jnp.repeat(jnp.repeat(f.scale, self.block[0], -2), self.block[1], -1)[..., :n, :k]
        w = (f.q.astype(jnp.float32) * s).astype(dtype).reshape(self.q.shape)
        lead, n_out = self.lead, len(self.q.shape) - self.lead - self.n_in
        to_param = stored_order(tuple(range(w.ndim)), lead, n_out)
        parts = jnp.split(w, list(itertools.accumulate(sizes))[:-1], axis=lead + n_out - 1)
        parts = tuple(jnp.transpose(p, to_param) for p in parts)
        if mesh_platform(jax.sharding.get_abstract_mesh()) == "cpu":
            # materialized: XLA:CPU has no bf16 x bf16 -> f32 dot taking the transposed view
            parts = jax.lax.optimization_barrier(parts)
        return parts

    @classmethod
    def from_checkpoint(cls, q_out_in: jax.Array, scale_inv: jax.Array,
                        block: tuple[int, int] = (BLOCK, BLOCK), *, in_dims: tuple | None = None,
                        out_dims: tuple | None = None) -> "QuantizedWeight":
        """From the HF layout, as is: e4m3 [..., out, in] and `weight_scale_inv` [..., out / b0,
        in / b1]; `in_dims` / `out_dims` split K and N into the parameter's dims."""
        *lead, n, k = q_out_in.shape
        in_dims, out_dims = tuple(in_dims or (k,)), tuple(out_dims or (n,))
        return cls(q=q_out_in.reshape(*lead, *out_dims, *in_dims),
                   scale=scale_inv.astype(jnp.float32), block=tuple(block), n_in=len(in_dims))


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale"],
                                 meta_fields=["block", "n_in"])


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
    """Per-block quantization of a [K, N] weight (`x @ w`) into the stored [N, K] orientation
    (the transpose fuses into the quantization); `block` as in QuantizedWeight (N rows, K
    columns); partial edge blocks allowed. `quantize_weight(w.T)` quantizes W^T for dy @ W^T
    with w's own layout as its values."""
    wt = w.T.astype(jnp.float32)
    n, k = wt.shape
    wp = _pad_to(_pad_to(wt, 0, block[0]), 1, block[1])
    nb, kb = wp.shape[0] // block[0], wp.shape[1] // block[1]
    blocks = wp.reshape(nb, block[0], kb, block[1])
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(1, 3)), _MIN_AMAX) / E4M3_MAX
    q = _cast_e4m3(blocks / scale[:, None, :, None]).reshape(wp.shape)[:n, :k]
    return QuantizedWeight(q=q, scale=scale, block=tuple(block))


def _scaled_dot(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array, tile: int) -> jax.Array:
    """sum over K-blocks i of (qa[:, i] @ qb[:, i]^T) * sa[:, i] * sb[:, i]: fp32 [m, n].

    qa [m, K] e4m3, sa [m, K/tile]; qb [n, K] e4m3, sb [n, K/tile]: both operands K-major
    (contraction dim minor), the layout XLA:GPU's FP8 GEMMs take, so neither is copied. Each
    block's product is an fp32-accumulated float8 dot of `tile`-wide slices of both; its
    scales apply before the sum (the "promote every 128 of K" rule)."""
    kb = qa.shape[1] // tile
    # both whole along K inside the loop: sliced along a split K, XLA gathered the whole
    # operand once per block (the FSDP-split weights of the 671B decode: 170 GB per step)
    qa, sa, qb, sb = (unsplit(v, (1,)) for v in (qa, sa, qb, sb))

    def block(i):
        a = jax.lax.dynamic_slice_in_dim(qa, i * tile, tile, 1)
        b = jax.lax.dynamic_slice_in_dim(qb, i * tile, tile, 1)
        p = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        sai = jax.lax.dynamic_index_in_dim(sa, i, 1, keepdims=False)
        sbi = jax.lax.dynamic_index_in_dim(sb, i, 1, keepdims=False)
        return p * sai[:, None] * sbi[None, :]

    # The first block's product starts the sum: inside shard_map it varies over the mesh axes
    # of both operands, which a jnp.zeros carry would not (the loop needs equal carry types).
    acc = block(0)
    if kb > 1:
        acc = jax.lax.fori_loop(1, kb, lambda i, acc: acc + block(i), acc)
    return acc


def _forward(x2: jax.Array, qw: QuantizedWeight, floor: float = _MIN_AMAX) -> jax.Array:
    """x @ W for a [N, K] QuantizedWeight (no lead dims): x in 1 x block_k tiles along K."""
    n, k = qw.q.shape
    bn, bk = qw.block
    qx, sx = quantize_tiles(x2, bk, floor)
    s = jnp.repeat(qw.scale, bn, axis=0)[:n]  # [N / bn, K / bk] -> one scale per row of W^T
    return _scaled_dot(qx, sx, _pad_to(qw.q, 1, bk), s, bk)


def _dgrad_t(dy2: jax.Array, wt: QuantizedWeight) -> jax.Array:
    """dy @ W^T given W^T as a weight ([K, N] values): dy in 1 x block_n tiles along N."""
    return _forward(dy2, wt, _MIN_AMAX_GRAD)


def _dgrad(dy2: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """dy @ W^T for a stored weight: its blocks transposed (a copy of the values; only the
    backward pass through a stored weight pays it, and the training path quantizes W^T from
    the master weight's own [K, N] layout instead, `quantize_weight(w.T)`: no copy)."""
    return _dgrad_t(dy2, qw.transpose())


def _wgrad(x2: jax.Array, dy2: jax.Array, tile: int = BLOCK) -> jax.Array:
    """x^T @ dy: both in `tile`-token tiles (1 x tile tiles of x^T and of dy^T)."""
    qxt, sxt = quantize_tiles(x2.T, tile)     # [k, Mp], [k, Mb]
    qdyt, sdyt = quantize_tiles(dy2.T, tile, _MIN_AMAX_GRAD)  # [n, Mp], [n, Mb]
    return _scaled_dot(qxt, sxt, qdyt, sdyt, tile)


# The three e4m3 products, for callers that arrange their own operands (grouped experts):
# forward x @ W, dgrad dy @ W^T given W^T's QuantizedWeight, wgrad x^T @ dy.
fp8_forward, fp8_dgrad, fp8_wgrad = _forward, _dgrad_t, _wgrad


@jax.custom_vjp
def _fp8_dense(x2, w):
    return _forward(x2, quantize_weight(w)).astype(x2.dtype)


def _fp8_dense_fwd(x2, w):
    return _fp8_dense(x2, w), (x2, w)


def _fp8_dense_bwd(res, dy):
    x2, w = res
    dx = _dgrad_t(dy, quantize_weight(w.T)).astype(x2.dtype)
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
        y = _fp8_dense_quantized(x2, w.flat())
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

