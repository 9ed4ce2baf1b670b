"""Blockwise MLA attention (dsv3_jax/layers/attention.py) against the dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT

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


@pytest.mark.parametrize("case", [*CASES, "offsets"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_block_equals_dense_with_gradients(case, dtype):
    """The CPU default for one score block: dense's function, its backward written out."""
    sq, kw = (45, CASES[case]) if case in CASES else (20, dict(q_offset=jnp.array([0, 31]),
                                                              kv_len=jnp.array([20, 51])))
    ops32 = _operands(sq, 45 if case in CASES else 64)
    ops = [x.astype(dtype) for x in ops32]
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    out = attention(*ops, scale=0.3, implementation="one_block", **kw)
    assert out.dtype == dtype and _rel(out, dense_attention(*ops32, scale=0.3, **kw)) < tol
    got = _grads(lambda *a, **k: attention(*a, implementation="one_block", **k), ops, **kw)
    want = _grads(dense_attention, ops32, **kw)
    for name, g, w in zip(("q_nope", "q_pe", "k_nope", "k_pe", "v"), got, want):
        assert g.dtype == dtype and _rel(g, w) < 10 * tol, (name, _rel(g, w))


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
    # the backward's dots too (XLA:CPU runs some bf16 x bf16 -> f32 orders only from fp32)
    got = _grads(lambda *a, **k: attention(*a, block_q=16, block_k=16, **k), ops16)
    for g, w in zip(got, _grads(dense_attention, ops32)):
        assert g.dtype == jnp.bfloat16 and _rel(g, w) < 3e-2, _rel(g, w)


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


# ------------------------------------------------------------------- backend kernels
def test_each_backend_gets_its_kernel_where_it_applies(monkeypatch):
    from dsv3_jax.layers import attention as A
    pick = lambda platform, dtype=jnp.bfloat16, sq=4096, sk=4096, offsets=False, segments=False: \
        A.default_implementation(dtype, sq, sk, offsets=offsets, segments=segments, platform=platform)
    monkeypatch.setattr(A, "_have_cudnn", lambda: True)
    assert pick("tpu") == "splash" and pick("tpu", segments=True) == "splash"
    assert pick("gpu") == "cudnn" and pick("gpu", segments=True) == "blockwise"
    assert pick("cpu") == "blockwise"
    # one score block on CPU: the dense form with its written-out backward (training at seq 256,
    # short prefills)
    assert pick("cpu", sq=256, sk=256) == "one_block" and pick("cpu", sq=256, sk=512) == "one_block"
    assert pick("cpu", sq=512, sk=512) == "blockwise"
    for platform in ("tpu", "gpu"):
        assert pick(platform, dtype=jnp.float32) == "blockwise"       # fp32: the reference
        assert pick(platform, sq=512, offsets=True) == "blockwise"    # chunked prefill
    monkeypatch.setattr(A, "_have_cudnn", lambda: False)
    assert pick("gpu") == "blockwise"
    with pytest.raises(ValueError, match="implementation 'flash'"):
        attention(*_operands(8, 8), scale=0.3, implementation="flash")


def test_splash_wrapper_matches_blockwise_in_interpret_mode():
    """MLA's split operands joined, scaled, padded (200 -> 256 tokens), segment ids, through the
    TPU kernel (Pallas interpret mode on CPU), forward and gradients."""
    seg = jnp.asarray(np.sort(np.random.default_rng(2).integers(0, 3, (B, 200)), axis=1))
    ops = _operands(200, 200)  # fp32: XLA:CPU has no bf16 x bf16 -> f32 dot for some layouts
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    got = attention(*ops, scale=0.3, implementation="splash", **kw)
    want = attention(*ops, scale=0.3, implementation="blockwise", **kw)
    assert _rel(got, want) < 1e-4
    g = _grads(lambda *a, **k: attention(*a, implementation="splash", **k), ops, **kw)
    w = _grads(lambda *a, **k: attention(*a, implementation="blockwise", **k), ops, **kw)
    for name, x, y in zip(("q_nope", "q_pe", "k_nope", "k_pe", "v"), g, w):
        assert _rel(x, y) < 1e-4, (name, _rel(x, y))


KERNEL_PROBE = """
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding
from dsv3_jax.aot.targets import parse_target
from dsv3_jax.layers.attention import attention
from sharding import make_mesh
from sharding.rules import logical_to_spec

mesh = make_mesh("data=4,tensor=2", devices=parse_target(sys.argv[1], 8).devices(8))
b, s, h = 8, 1000, 8  # 1000: padded to the kernels' multiples
heads = ("batch", "seq", "heads", None)
args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(
            mesh, logical_to_spec(axes, shape, mesh)))
        for shape, axes in (((b, s, h, 128), heads), ((b, s, h, 64), heads), ((b, s, h, 128), heads),
                            ((b, s, 64), ("batch", "seq", None)), ((b, s, h, 128), heads))]
loss = lambda *a: jnp.sum(attention(*a, scale=0.1).astype(jnp.float32))
with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).compile().as_text()
print(hlo.count(sys.argv[2]), hlo.count(" while("))
"""


@pytest.mark.parametrize("target, call", [("tpu-v5p:2x2x2", 'custom_call_target="tpu_custom_call"'),
                                          ("h100:1x8", 'custom_call_target="__cudnn$fmha')])
def test_backend_kernels_lower_for_the_real_compilers(target, call):
    """Forward + backward of bf16 MLA attention on a data=4,tensor=2 mesh, compiled by libtpu /
    XLA:GPU (deviceless): the kernel's custom calls are in the program and no blockwise loop."""
    import importlib.util
    import os
    import subprocess
    import sys
    from dsv3_jax.aot.targets import parse_target
    from dsv3_jax.layers.attention import _have_cudnn

    if importlib.util.find_spec("libtpu" if target.startswith("tpu") else "jax_plugins.xla_cuda12") is None:
        pytest.skip('the target compiler is missing: pip install -e ".[aot]"')
    if target.startswith("h100") and not _have_cudnn():
        pytest.skip('cuDNN is missing: pip install -e ".[aot]"')
    env = dict(os.environ, **parse_target(target, 8).environ(8))
    proc = subprocess.run([sys.executable, "-c", KERNEL_PROBE, target, call], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls, loops = (int(v) for v in proc.stdout.split()[-2:])
    assert calls >= 2 and loops == 0, (calls, loops)  # forward and backward kernels


def test_implementation_context_reaches_every_call(monkeypatch):
    from dsv3_jax.layers import attention as A
    calls = []
    monkeypatch.setattr(A, "dense_attention", lambda *a, **k: calls.append(1) or a[-1][..., :1, :, :])
    ops = _operands(8, 8)
    with A.implementation("dense"):
        A.attention(*ops, scale=0.3, block_q=8)  # the context wins over explicit blocks
    A.attention(*ops, scale=0.3, block_q=8)  # outside: blockwise again
    assert calls == [1]
    with pytest.raises(ValueError, match="allowed"):
        with A.implementation("flash"):
            pass
