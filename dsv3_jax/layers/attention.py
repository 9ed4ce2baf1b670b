"""Blockwise (flash-style) causal attention with MLA's shapes, for training and prefill.

MLA's scores are `q_nope . k_nope + q_pe . k_pe` (per-head 128-dim keys plus ONE 64-dim roped key
shared by all heads) and its values are 128-dim: `attention` takes those five operands as they
are, so no key is broadcast over heads and V is not padded to the 192-dim query/key width.

Queries and keys are cut into blocks; each query block runs an online softmax (fp32 running
max and sum) over the key blocks it can see, so no `[seq, seq]` score matrix ever exists, and
key blocks that lie wholly after a query block's last position are never visited (causal
attention costs about half of full). The custom VJP saves only the output and the per-row
log-sum-exp and recomputes each block's probabilities in the backward pass.

Masking is by position: query i of row b sits at `q_offset[b] + i`, key j at `j`; key j is
visible to query i when `j <= q_offset[b] + i`, `j < kv_len[b]` and, with segment ids, both have
the same segment (packed documents). Training passes neither offset nor lengths; the engine's
chunked prefill attends a chunk of queries at `q_offset` over the cache's first `kv_len`
positions.

`attention` is pure JAX, the reference and the default on every backend; `BLOCK_SIZES` picks
the blocks per backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

_NEG = -jnp.inf
_M0 = -1e30  # running-max start: finite, so a fully masked row gives exp(-inf - m0) = 0, not NaN


def block_sizes(seq_q: int, seq_k: int, platform: str | None = None) -> tuple[int, int]:
    """(block_q, block_k): 512 x 512 score tiles on accelerators (an fp32 [heads, 512, 512]
    tile per row is 128 MB at 128 heads), 256 x 512 on CPU; never longer than the sequence
    (rounded up to a multiple of 8)."""
    platform = platform or jax.default_backend()
    bq, bk = (256, 512) if platform == "cpu" else (512, 512)
    fit = lambda s, b: min(b, -(-s // 8) * 8)
    return fit(seq_q, bq), fit(seq_k, bk)


def attention(q_nope: Float[Array, "batch sq heads nope"], q_pe: Float[Array, "batch sq heads rope"],
              k_nope: Float[Array, "batch sk heads nope"], k_pe: Float[Array, "batch sk rope"],
              v: Float[Array, "batch sk heads dv"], *, scale: float,
              q_offset: Int[Array, "batch"] | None = None, kv_len: Int[Array, "batch"] | None = None,
              q_segment_ids: Int[Array, "batch sq"] | None = None,
              kv_segment_ids: Int[Array, "batch sk"] | None = None,
              block_q: int | None = None, block_k: int | None = None
              ) -> Float[Array, "batch sq heads dv"]:
    """Causal softmax attention `softmax(scale * (q_nope k_nope^T + q_pe k_pe^T) + mask) v`,
    scores and softmax in fp32, the probabilities cast to v's dtype for the value product (as
    the dense form does); output in v's dtype."""
    b, sq, h, _ = q_nope.shape
    sk = k_nope.shape[1]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: pass both q_segment_ids and kv_segment_ids, or neither")
    dq, dk = block_sizes(sq, sk)
    bq, bk = block_q or dq, block_k or dk
    q_offset = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    kv_len = jnp.full((b,), sk, jnp.int32) if kv_len is None else kv_len.astype(jnp.int32)
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, sq), jnp.int32)
        kv_segment_ids = jnp.zeros((b, sk), jnp.int32)
    pad_q, pad_k = -sq % bq, -sk % bk
    padq = lambda x: jnp.pad(x, [(0, 0), (0, pad_q)] + [(0, 0)] * (x.ndim - 2))
    padk = lambda x: jnp.pad(x, [(0, 0), (0, pad_k)] + [(0, 0)] * (x.ndim - 2))
    out = _flash(float(scale), bq, bk, padq(q_nope), padq(q_pe), padk(k_nope), padk(k_pe), padk(v),
                 q_offset, kv_len, padq(q_segment_ids.astype(jnp.int32)),
                 padk(kv_segment_ids.astype(jnp.int32)))
    return out[:, :sq]


def dense_attention(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, q_offset=None, kv_len=None,
                    q_segment_ids=None, kv_segment_ids=None) -> jax.Array:
    """The same function with the whole [batch, heads, sq, sk] score matrix: the oracle."""
    f32 = jnp.float32
    s = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=f32)
         + jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe, preferred_element_type=f32)) * scale
    mask = _mask(jnp.arange(q_nope.shape[1]), jnp.arange(k_nope.shape[1]), q_offset, kv_len,
                 q_segment_ids, kv_segment_ids, q_nope.shape[0])
    p = jax.nn.softmax(jnp.where(mask[:, None], s, _NEG), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=f32).astype(v.dtype)


def _mask(qi, kj, q_offset, kv_len, q_seg, k_seg, b) -> jax.Array:
    """[batch, q, k] visibility of keys at indices kj to queries at block indices qi."""
    off = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset
    m = kj[None, None, :] <= (off[:, None, None] + qi[None, :, None])
    if kv_len is not None:
        m = m & (kj[None, None, :] < kv_len[:, None, None])
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    return m


def _blocks_visible(i, bq: int, bk: int, nk: int, q_offset, kv_len):
    """How many key blocks query block i can see: the causal and length bounds, over the batch."""
    last_q = jnp.max(q_offset) + (i + 1) * bq - 1
    causal = last_q // bk + 1
    filled = (jnp.max(kv_len) + bk - 1) // bk
    return jnp.clip(jnp.minimum(causal, filled), 0, nk)


def _scores(qn, qp, kn, kp, scale):
    f32 = jnp.float32
    return (jnp.einsum("bqhd,bkhd->bhqk", qn, kn, preferred_element_type=f32)
            + jnp.einsum("bqhr,bkr->bhqk", qp, kp, preferred_element_type=f32)) * scale


def _slice(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale, bq, bk, qn, qp, kn, kp, v, q_offset, kv_len, q_seg, k_seg):
    return _flash_fwd(scale, bq, bk, qn, qp, kn, kp, v, q_offset, kv_len, q_seg, k_seg)[0]


def _flash_fwd(scale, bq, bk, qn, qp, kn, kp, v, q_offset, kv_len, q_seg, k_seg):
    b, sq, h, _ = qn.shape
    nq, nk = sq // bq, kn.shape[1] // bk
    dv = v.shape[-1]
    f32 = jnp.float32

    def q_block(i):
        q0 = i * bq
        qn_i, qp_i, qs_i = _slice(qn, q0, bq), _slice(qp, q0, bq), _slice(q_seg, q0, bq)
        qi = q0 + jnp.arange(bq)

        def kv_block(j, carry):
            m, l, acc = carry
            k0 = j * bk
            s = _scores(qn_i, qp_i, _slice(kn, k0, bk), _slice(kp, k0, bk), scale)
            mask = _mask(qi, k0 + jnp.arange(bk), q_offset, kv_len, qs_i, _slice(k_seg, k0, bk), b)
            s = jnp.where(mask[:, None], s, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), _slice(v, k0, bk),
                            preferred_element_type=f32)
            return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, h, bq), _M0, f32), jnp.zeros((b, h, bq), f32),
                jnp.zeros((b, h, bq, dv), f32))
        m, l, acc = jax.lax.fori_loop(0, _blocks_visible(i, bq, bk, nk, q_offset, kv_len),
                                      kv_block, init)
        l = jnp.where(l == 0, 1.0, l)
        out = (acc / l[..., None]).astype(v.dtype).transpose(0, 2, 1, 3)  # [b, bq, h, dv]
        return out, m + jnp.log(l)

    outs, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, b, bq, h, dv], [nq, b, h, bq]
    out = outs.transpose(1, 0, 2, 3, 4).reshape(b, sq, h, dv)
    lse = lse.transpose(1, 2, 0, 3).reshape(b, h, sq)
    return out, (qn, qp, kn, kp, v, q_offset, kv_len, q_seg, k_seg, out, lse)


def _flash_bwd(scale, bq, bk, res, dout):
    qn, qp, kn, kp, v, q_offset, kv_len, q_seg, k_seg, out, lse = res
    b, sq, h, _ = qn.shape
    nq, nk = sq // bq, kn.shape[1] // bk
    f32 = jnp.float32
    # D_i = sum_d dO_id O_id: the softmax backward's row term
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(f32), out.astype(f32))

    def q_block(carry, i):
        dkn, dkp, dv = carry
        q0 = i * bq
        qn_i, qp_i, qs_i = _slice(qn, q0, bq), _slice(qp, q0, bq), _slice(q_seg, q0, bq)
        do_i = _slice(dout, q0, bq)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, q0, bq, axis=2)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, q0, bq, axis=2)
        qi = q0 + jnp.arange(bq)

        def kv_block(j, inner):
            dqn, dqp, dkn, dkp, dv = inner
            k0 = j * bk
            kn_j, kp_j, v_j = _slice(kn, k0, bk), _slice(kp, k0, bk), _slice(v, k0, bk)
            s = _scores(qn_i, qp_i, kn_j, kp_j, scale)
            mask = _mask(qi, k0 + jnp.arange(bk), q_offset, kv_len, qs_i, _slice(k_seg, k0, bk), b)
            p = jnp.where(mask[:, None], jnp.exp(s - lse_i[..., None]), 0.0)  # [b, h, bq, bk]
            pc = p.astype(v.dtype)
            dv_j = jnp.einsum("bhqk,bqhd->bkhd", pc, do_i, preferred_element_type=f32)
            dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j, preferred_element_type=f32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(qn.dtype)
            dqn = dqn + jnp.einsum("bhqk,bkhd->bqhd", ds, kn_j, preferred_element_type=f32)
            dqp = dqp + jnp.einsum("bhqk,bkr->bqhr", ds, kp_j, preferred_element_type=f32)
            dkn_j = jnp.einsum("bhqk,bqhd->bkhd", ds, qn_i, preferred_element_type=f32)
            dkp_j = jnp.einsum("bhqk,bqhr->bkr", ds, qp_i, preferred_element_type=f32)
            add = lambda acc, d: jax.lax.dynamic_update_slice_in_dim(
                acc, _slice(acc, k0, bk) + d, k0, axis=1)
            return dqn, dqp, add(dkn, dkn_j), add(dkp, dkp_j), add(dv, dv_j)

        init = (jnp.zeros(qn_i.shape, f32), jnp.zeros(qp_i.shape, f32), dkn, dkp, dv)
        dqn_i, dqp_i, dkn, dkp, dv = jax.lax.fori_loop(
            0, _blocks_visible(i, bq, bk, nk, q_offset, kv_len), kv_block, init)
        return (dkn, dkp, dv), (dqn_i, dqp_i)

    zeros = lambda x: jnp.zeros(x.shape, f32)
    (dkn, dkp, dv), (dqn, dqp) = jax.lax.scan(q_block, (zeros(kn), zeros(kp), zeros(v)),
                                              jnp.arange(nq))
    unblock = lambda d: d.transpose(1, 0, 2, *range(3, d.ndim)).reshape(b, sq, *d.shape[3:])
    int_zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return (unblock(dqn).astype(qn.dtype), unblock(dqp).astype(qp.dtype), dkn.astype(kn.dtype),
            dkp.astype(kp.dtype), dv.astype(v.dtype), int_zero(q_offset), int_zero(kv_len),
            int_zero(q_seg), int_zero(k_seg))


_flash.defvjp(_flash_fwd, _flash_bwd)
