"""Blockwise MLA attention (dsv3_jax/layers/attention.py) against the dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.layers.attention import attention, block_sizes, dense_attention

B, H, DN, DR, DV = 2, 3, 16, 8, 12


def _operands(sq, sk, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return f(B, sq, H, DN), f(B, sq, H, DR), f(B, sk, H, DN), f(B, sk, DR), f(B, sk, H, DV)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _grads(fn, ops, **kw):
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a, scale=0.3, **kw).astype(jnp.float32)))
    return jax.grad(loss, argnums=range(5))(*ops)


SEG = np.sort(np.random.default_rng(1).integers(0, 4, (B, 45)), axis=1)
CASES = {
    "causal": dict(),
    "segments": dict(q_segment_ids=jnp.asarray(SEG), kv_segment_ids=jnp.asarray(SEG)),
}


@pytest.mark.parametrize("case", CASES)
def test_blockwise_equals_dense_with_gradients(case):
    ops = _operands(45, 45)  # 45: no block size divides it
    kw = CASES[case]
    out = attention(*ops, scale=0.3, block_q=8, block_k=16, **kw)
    assert _rel(out, dense_attention(*ops, scale=0.3, **kw)) < 1e-6
    got = _grads(lambda *a, **k: attention(*a, block_q=8, block_k=16, **k), ops, **kw)
    want = _grads(dense_attention, ops, **kw)
    for name, g, w in zip(("q_nope", "q_pe", "k_nope", "k_pe", "v"), got, want):
        assert _rel(g, w) < 1e-5, (name, _rel(g, w))


def test_offsets_and_lengths_as_in_chunked_prefill():
    """A chunk of 20 queries at per-row offsets over a 64-key cache filled to per-row lengths."""
    ops = _operands(20, 64)
    kw = dict(q_offset=jnp.array([0, 31]), kv_len=jnp.array([20, 51]))
    out = attention(*ops, scale=0.3, block_q=8, block_k=16, **kw)
    assert _rel(out, dense_attention(*ops, scale=0.3, **kw)) < 1e-6
    got = _grads(lambda *a, **k: attention(*a, block_q=8, block_k=16, **k), ops, **kw)
    for g, w in zip(got, _grads(dense_attention, ops, **kw)):
        assert _rel(g, w) < 1e-5


def test_bf16_operands_track_fp32():
    ops32 = _operands(40, 40)
    ops16 = [x.astype(jnp.bfloat16) for x in ops32]
    out = attention(*ops16, scale=0.3, block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    assert _rel(out, dense_attention(*ops32, scale=0.3)) < 2e-2


def test_key_blocks_past_the_visible_range_are_never_read():
    """NaN keys and values in blocks no query may see: any visit would make the output NaN."""
    qn, qp, kn, kp, v = _operands(16, 64)
    poison = lambda x: x.at[:, 32:].set(jnp.nan)
    ops = (qn, qp, poison(kn), poison(kp), poison(v))
    # causal: queries at 0..15 see key blocks 0 (and 1 is allowed to be skipped) but never 2, 3
    out, grads = jax.value_and_grad(
        lambda *a: jnp.sum(attention(*a, scale=0.3, block_q=8, block_k=16)), argnums=range(5))(*ops)
    assert np.isfinite(out) and all(np.isfinite(np.asarray(g[:, :32])).all() for g in grads[2:])
    # lengths: queries late in the sequence, but the cache is filled only to 32
    kw = dict(q_offset=jnp.array([48, 48]), kv_len=jnp.array([32, 20]))
    assert np.isfinite(attention(*ops, scale=0.3, block_q=8, block_k=16, **kw)).all()


def test_memory_grows_linearly_not_quadratically():
    """Compiled temporaries of forward + backward: 4x the sequence is far less than 16x."""
    def temp(s):
        ops = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _operands(s, s)]
        loss = lambda *a: jnp.sum(attention(*a, scale=0.3, block_q=128, block_k=128))
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*ops).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp(1024), temp(4096)
    assert large < 6 * small, (small, large)
    # the dense [batch, heads, s, s] fp32 scores alone would be 400 MB at 4096
    assert large < B * H * 4096 * 4096 * 4 / 8, large


def test_block_sizes():
    assert block_sizes(64, 64, "cpu") == (64, 64)
    assert block_sizes(4096, 4096, "gpu") == (512, 512)
    assert block_sizes(4096, 4096, "cpu") == (256, 512)
    assert block_sizes(45, 3, "tpu") == (48, 8)
