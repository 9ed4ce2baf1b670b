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

The blockwise form is pure JAX: the reference, tested on CPU, and the default wherever no
backend kernel applies. Where one does (causal attention with no offsets, bf16/fp16 operands),
`attention` uses it: on TPU Pallas splash attention (MLA's 192-dim keys and 128-dim values as
they are, segment ids supported; run per shard under `shard_map` over the logical batch and
heads axes), on NVIDIA GPUs cuDNN flash attention through `jax.nn.dot_product_attention`
(whose API needs V as wide as K: V is zero-padded to 192, +20% attention FLOPs; no segment
ids), also per shard (its own partitioning rule fails inside the pipeline's shard_map); those
wrappers are in attention_kernels.py. On CPU,
scores that fit one block use "one_block": the dense form with its backward pass written out.
`implementation=` (or the `implementation(...)` context) forces a choice, "dense" being the
whole-score-matrix form by autodiff (the oracle); `block_sizes` picks the blocks per backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dsv3_jax.layers.attention_kernels import _concat_heads, _cudnn, _have_cudnn, _platform, _splash

IMPLEMENTATIONS = ("blockwise", "splash", "cudnn", "dense", "one_block")
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention", default=None)


@contextlib.contextmanager
def implementation(name: str | None):
    """`with implementation("dense"): ...` makes every `attention` call traced inside use that
    implementation (None: the default choice), e.g. to compare kernels in a benchmark."""
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}; allowed {IMPLEMENTATIONS}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)

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


def working_set_bytes(tokens: float, seq: int, heads: float, qk_dim: int, v_dim: int,
                      itemsize: int) -> float:
    """Bytes one layer's attention holds at its backward pass on one device (the planner's
    count): q, k, v and the output and its gradient in the compute dtype, the fp32 gradient
    accumulators of q, k, v, and four fp32 [rows, heads, block, block] tiles (scores,
    probabilities, their gradients) per block step; linear in the sequence, never S^2."""
    bq, bk = block_sizes(seq, seq, platform="tpu")
    rows = tokens / seq
    operands = tokens * heads * ((2 * qk_dim + v_dim) + 2 * v_dim) * itemsize
    grads = tokens * heads * (2 * qk_dim + v_dim) * 4
    return operands + grads + rows * heads * bq * bk * 4 * 4


def attention(q_nope: Float[Array, "batch sq heads nope"], q_pe: Float[Array, "batch sq heads rope"],
              k_nope: Float[Array, "batch sk heads nope"], k_pe: Float[Array, "batch sk rope"],
              v: Float[Array, "batch sk heads dv"], *, scale: float,
              q_offset: Int[Array, "batch"] | None = None, kv_len: Int[Array, "batch"] | None = None,
              q_segment_ids: Int[Array, "batch sq"] | None = None,
              kv_segment_ids: Int[Array, "batch sk"] | None = None,
              block_q: int | None = None, block_k: int | None = None,
              implementation: str | None = None) -> Float[Array, "batch sq heads dv"]:
    """Causal softmax attention `softmax(scale * (q_nope k_nope^T + q_pe k_pe^T) + mask) v`,
    scores and softmax in fp32, the probabilities cast to v's dtype for the value product (as
    the dense form does); output in v's dtype. `implementation`: one of IMPLEMENTATIONS, None
    for the backend's kernel where it applies (see the module docstring); explicit block sizes
    mean the blockwise form unless an `implementation` context says otherwise."""
    b, sq, h, _ = q_nope.shape
    sk = k_nope.shape[1]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: pass both q_segment_ids and kv_segment_ids, or neither")
    impl = implementation or _FORCED.get() or ("blockwise" if block_q or block_k else
                                                default_implementation(
        q_nope.dtype, sq, sk, offsets=q_offset is not None or kv_len is not None,
        segments=q_segment_ids is not None))
    if impl == "splash":
        return _splash(q_nope, q_pe, k_nope, k_pe, v, scale, q_segment_ids, kv_segment_ids)
    if impl == "cudnn":
        if q_segment_ids is not None or q_offset is not None or kv_len is not None:
            raise ValueError("attention: the cuDNN kernel takes no segment ids, offsets or lengths")
        return _cudnn(q_nope, q_pe, k_nope, k_pe, v, scale)
    if impl == "dense":
        return dense_attention(q_nope, q_pe, k_nope, k_pe, v, scale=scale, q_offset=q_offset,
                               kv_len=kv_len, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids)
    if impl == "one_block":
        return one_block_attention(q_nope, q_pe, k_nope, k_pe, v, scale=scale, q_offset=q_offset,
                                   kv_len=kv_len, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids)
    if impl != "blockwise":
        raise ValueError(f"attention: implementation {impl!r}; allowed {IMPLEMENTATIONS}")
    dq, dk = block_sizes(sq, sk, _platform())  # the target's, also when compiling ahead of time
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


def default_implementation(dtype, seq_q: int, seq_k: int, *, offsets: bool, segments: bool,
                           platform: str | None = None) -> str:
    """The backend kernel where it applies (causal, no offsets, bf16/fp16), else "blockwise";
    on CPU "one_block" when the scores are one block anyway (the blockwise loop would only add
    its recomputation in the backward pass and its bookkeeping)."""
    platform = platform or _platform()
    if platform == "cpu":
        bq, bk = block_sizes(seq_q, seq_k, platform)
        return "one_block" if seq_q <= bq and seq_k <= bk else "blockwise"
    if offsets or seq_q != seq_k or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "blockwise"
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and not segments and _have_cudnn():
        return "cudnn"
    return "blockwise"


def dense_attention(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, q_offset=None, kv_len=None,
                    q_segment_ids=None, kv_segment_ids=None) -> jax.Array:
    """The same function with the whole [batch, heads, sq, sk] score matrix: the oracle
    (differentiated by autodiff through the forward pass `one_block_attention` also runs)."""
    mask = _whole_mask(q_nope, k_nope, q_offset, kv_len, q_segment_ids, kv_segment_ids)
    return _one_block_fwd(float(scale), *_concat_heads(q_nope, q_pe, k_nope, k_pe), v, mask)[0]


def one_block_attention(q_nope: Float[Array, "batch sq heads nope"],
                        q_pe: Float[Array, "batch sq heads rope"],
                        k_nope: Float[Array, "batch sk heads nope"],
                        k_pe: Float[Array, "batch sk rope"],
                        v: Float[Array, "batch sk heads dv"], *, scale: float,
                        q_offset: Int[Array, "batch"] | None = None,
                        kv_len: Int[Array, "batch"] | None = None,
                        q_segment_ids: Int[Array, "batch sq"] | None = None,
                        kv_segment_ids: Int[Array, "batch sk"] | None = None
                        ) -> Float[Array, "batch sq heads dv"]:
    """`dense_attention`'s function with its backward pass written out (a custom VJP: the
    probabilities saved, the softmax's gradient in one expression, the scale on dq and dk;
    forward + backward of one layer of benchmarks/moe_speed.py's model 15 vs 22 ms by autodiff
    of the dense form; transposing the probabilities behind an optimization barrier first, which
    helped XLA:CPU's older dot emitter, now costs it 20 ms). The scores are one
    product of the concatenated query and key (`_concat_heads`, as transformers computes them):
    two products summed cost XLA:CPU a transposed copy of the rope part's [batch, heads, sq, sk]
    scores (one layer of benchmarks/moe_speed.py: 2x PyTorch's attention time)."""
    mask = _whole_mask(q_nope, k_nope, q_offset, kv_len, q_segment_ids, kv_segment_ids)
    return _one_block(float(scale), *_concat_heads(q_nope, q_pe, k_nope, k_pe), v, mask)


def _whole_mask(q_nope, k_nope, q_offset, kv_len, q_seg, k_seg) -> jax.Array:
    """[batch, sq, sk] visibility of every key to every query."""
    return _mask(jnp.arange(q_nope.shape[1]), jnp.arange(k_nope.shape[1]), q_offset, kv_len,
                 q_seg, k_seg, q_nope.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _one_block(scale, q, k, v, mask):
    return _one_block_fwd(scale, q, k, v, mask)[0]


def _one_block_fwd(scale, q, k, v, mask):
    """q [b, sq, h, d], k [b, sk, h, d]: MLA's nope and rope parts concatenated."""
    s = _dot("bqhd,bkhd->bhqk", q, k) * scale
    p = jax.nn.softmax(jnp.where(mask[:, None], s, _NEG), axis=-1)  # [b, h, q, k] fp32
    out = _dot("bhqk,bkhd->bqhd", p.astype(v.dtype), v).astype(v.dtype)
    return out, (q, k, v, p)  # p is zero where the mask hides a key


def _one_block_bwd(scale, res, dout):
    q, k, v, p = res
    dout = dout.astype(v.dtype)
    dv = _dot("bhqk,bqhd->bkhd", p.astype(v.dtype), dout)
    dp = _dot("bqhd,bkhd->bhqk", dout, v)
    ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))).astype(q.dtype)
    # the scale multiplies dq and dk, not the [b, h, q, k] ds (XLA:CPU materialised it as a
    # broadcast operand there)
    return ((_dot("bhqk,bkhd->bqhd", ds, k) * scale).astype(q.dtype),
            (_dot("bhqk,bqhd->bkhd", ds, q) * scale).astype(k.dtype),
            dv.astype(v.dtype), None)


_one_block.defvjp(_one_block_fwd, _one_block_bwd)


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


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with fp32 accumulation. XLA:CPU lacks bf16 x bf16 -> f32 dots for some of these
    operand orders; there the operands go up to fp32 first, which changes nothing (a product of
    two bf16 numbers is exact in fp32)."""
    if _platform() == "cpu" and jnp.bfloat16 in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(qn, qp, kn, kp, scale):
    return (_dot("bqhd,bkhd->bhqk", qn, kn)
            + _dot("bqhr,bkr->bhqk", qp, kp)) * scale


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
            pv = _dot("bhqk,bkhd->bhqd", p.astype(v.dtype), _slice(v, k0, bk))
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
            dv_j = _dot("bhqk,bqhd->bkhd", pc, do_i)
            dp = _dot("bqhd,bkhd->bhqk", do_i, v_j)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(qn.dtype)
            dqn = dqn + _dot("bhqk,bkhd->bqhd", ds, kn_j)
            dqp = dqp + _dot("bhqk,bkr->bqhr", ds, kp_j)
            dkn_j = _dot("bhqk,bqhd->bkhd", ds, qn_i)
            dkp_j = _dot("bhqk,bqhr->bkr", ds, qp_i)
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
