"""Chunked cross entropy (dsv3_jax/train/losses.py) against the unchunked formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.model import head_logits
from dsv3_jax.train.losses import head_nll, heads_nll, lm_loss, loss_peak_bytes, vocab_chunk
from tests.conftest import FIXTURES

B, S, D, V = 2, 23, 16, 300


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _unchunked(x, gain, w, targets, weights, dtype):
    """The formula as the loss used to compute it: whole logits, log-softmax, pick, sum."""
    logits = jnp.einsum("bsd,dv->bsv", (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
                                        * gain).astype(dtype), w.astype(dtype),
                        preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)


def _chunked(x, gain, w, targets, weights, dtype, chunk):
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * gain
    return head_nll(h, w, targets, weights, dtype=dtype, chunk=chunk)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
    gain = jnp.asarray(1 + 0.1 * rng.standard_normal(D), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (B, S)), jnp.float32)
    return x, gain, w, targets, weights


@pytest.mark.parametrize("chunk", [7, 64, 100, 300])  # 300 / 7 and 300 / 64: a partial last chunk
def test_chunked_loss_and_gradients_equal_the_unchunked_formula(inputs, chunk):
    """fp32: the loss and its gradients w.r.t. the hidden state, the final norm's gain and
    lm_head, with per-token weights, for chunk sizes that do and do not divide the vocabulary
    (300: one chunk, the plain formula)."""
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), static_argnums=(5,))
    ref_v, ref_g = grad(_unchunked)(*inputs, jnp.float32)
    val, g = grad(lambda *a: _chunked(*a, chunk))(*inputs, jnp.float32)
    assert abs(float(val) - float(ref_v)) <= 1e-6 * abs(float(ref_v))
    for name, a, b in zip(("hidden", "norm gain", "lm_head"), g, ref_g):
        assert _rel(a, b) <= 1e-6, (name, _rel(a, b))


def test_bf16_head_matches_transformer_head(inputs):
    """Under bf16 the chunks multiply bf16 operands with fp32 accumulation, as Transformer.head
    does: same logits bit for bit, the loss to fp32 summation order."""
    x, gain, w, targets, weights = inputs
    ref = float(jax.jit(_unchunked, static_argnums=(5,))(x, gain, w, targets, weights, jnp.bfloat16))
    val = float(jax.jit(_chunked, static_argnums=(5, 6))(x, gain, w, targets, weights, jnp.bfloat16, 64))
    assert abs(val - ref) <= 1e-5 * abs(ref)
    grad = jax.grad(lambda *a: _chunked(*a, jnp.bfloat16, 64), argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(*inputs).jaxpr
    dots = [(tuple((v.aval.dtype, v.aval.shape) for v in e.invars), e.params["preferred_element_type"])
            for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    hidden, chunk, logits = (bf16, (B, S, D)), (bf16, (D, 1, 64)), (bf16, (B, S, 1, 64))
    # forward, its recomputation in the backward pass, d hidden, d lm_head
    assert sorted(dots, key=str) == sorted([((hidden, chunk), f32)] * 2 + [((logits, chunk), f32),
                                            ((hidden, logits), f32)], key=str), dots
    h = RMSNorm(D, eps=1e-6, param_dtype=jnp.float32)(x)
    np.testing.assert_array_equal(head_logits(h, w[:, :64], jnp.bfloat16),
                                  head_logits(h, w, jnp.bfloat16)[..., :64])


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def test_vocab_chunk_follows_the_byte_budget():
    # V3's vocabulary, one 4K row per device: 16 chunks of 8,080 entries
    assert vocab_chunk(4096, 129280) == 8080
    assert vocab_chunk(8 * 4096, 129280) == 1018             # more tokens per device: smaller chunks
    assert vocab_chunk(4096, 129280 // 4) == 8080            # a tensor=4 shard: 4 chunks of it
    assert vocab_chunk(512, 4096) == 4096                    # small models: one chunk
    assert vocab_chunk(4096, 8200) == 4100                   # spread evenly: 2 x 4100, not 8192 + 8
    assert vocab_chunk(10**9, 10**6) == 1


def test_compiled_temp_memory_drops():
    """The compiled loss + gradients never hold [tokens, vocab] fp32: XLA's temporaries at 2K
    tokens x 32K vocabulary shrink from the whole logits (and gradient) to a chunk's."""
    s, d, v = 2048, 64, 32768
    args = (jax.ShapeDtypeStruct((1, s, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((1, s), jnp.int32))

    def temp(chunk):
        f = jax.grad(lambda h, w, t: head_nll(h, w, t, chunk=chunk), argnums=(0, 1))
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits = s * v * 4
    full, chunked = temp(v), temp(4096)  # 4096 entries: 1/8 of the logits per chunk
    assert full >= 2 * logits and chunked < full / 6, (full, chunked, logits)


def test_model_loss_chunked_equals_materialised_logits():
    """The whole model (MTP on, fp32): lm_loss through chunks equals the loss of the
    materialised logits (`forward(logits=True)`), and so do the gradients of every parameter."""
    cfg = ModelConfig.from_json(FIXTURES / "v3_mtp")
    model = init_model(cfg, seed=0)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 14)), jnp.int32)

    def logits_path(m, b):
        out = m.forward(b[:, :-1], mtp=True)
        ce = lambda lg, t: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg, -1), t[..., None], -1))
        balance = out.balance.sum() + out.mtp_balance.sum()  # main and MTP MoE layers
        return ce(out.logits, b[:, 1:]) + 0.3 * ce(out.mtp_logits[0], b[:, 2:]) + 0.01 * balance

    def chunked(m, b):
        return lm_loss(m, b, mtp_lambda=0.3, balance_alpha=0.01, chunk=48)[0]  # 256 = 5 x 48 + 16

    @nnx.jit
    def both(m, b):
        return nnx.value_and_grad(logits_path)(m, b), nnx.value_and_grad(chunked)(m, b)

    (ref, ref_g), (val, g) = both(model, batch)
    assert abs(float(val) - float(ref)) <= 1e-6 * abs(float(ref))
    ref_g, g = dict(nnx.to_flat_state(ref_g)), dict(nnx.to_flat_state(g))
    for k in ref_g:
        a, b = np.asarray(g[k].get_value()), np.asarray(ref_g[k].get_value())
        if np.abs(b).max() > 0:
            assert _rel(a, b) <= 2e-6, (k, _rel(a, b))


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "expert=2,tensor=4"])
def test_vocabulary_split_over_tensor_equals_one_device(inputs, spec):
    """Under a mesh the vocabulary is split over "tensor": each device runs the chunks of its
    shard (default chunk size from the local shard, and one that does not divide it); loss and
    gradients equal the single-device ones."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sharding import make_mesh
    x, gain, w, targets, weights = inputs
    x, targets, weights = (jnp.concatenate([a, a[::-1]]) for a in (x, targets, weights))  # batch 4
    w = jnp.concatenate([w, w[:, :4]], axis=1)  # vocab 304: 4 x 76 and 2 x 152
    args = (x, gain, w, targets, weights)
    grad = lambda chunk: jax.jit(jax.value_and_grad(
        lambda *a: _chunked(*a, jnp.float32, chunk), argnums=(0, 1, 2)))
    ref_v, ref_g = grad(None)(*args)
    mesh = make_mesh(spec)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    batch = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
    placed = (put(x, P(batch)), put(gain, P()), put(w, P(None, "tensor")), put(targets, P(batch)),
              put(weights, P(batch)))
    with jax.set_mesh(mesh):
        for chunk in (None, 30):
            val, g = grad(chunk)(*placed)
            assert abs(float(val) - float(ref_v)) <= 1e-6 * abs(float(ref_v))
            for name, a, b in zip(("hidden", "norm gain", "lm_head"), g, ref_g):
                assert _rel(a, b) <= 1e-6, (spec, chunk, name, _rel(a, b))


@pytest.mark.parametrize("heads", [1, 2])
def test_planner_count_of_the_loss_matches_the_compiler(heads):
    """plan.py's logits part (`loss_peak_bytes`) against XLA:CPU's temporaries of the loss head
    as lm_loss runs it (bf16 compute, fp32 lm_head, main + MTP in one pass) at 8K tokens x 64K
    vocabulary, default chunks: within 25%."""
    s, d, v = 8192, 512, 65536
    args = ([jax.ShapeDtypeStruct((1, s, d), jnp.bfloat16)] * heads,
            jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((1, s), jnp.int32))
    f = jax.grad(lambda hs, w, t: sum(heads_nll(hs, w, [t] * heads, [None] * heads,
                                                dtype=jnp.bfloat16)), argnums=(0, 1))
    temp = jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert vocab_chunk(s, v) < v  # chunked
    assert abs(loss_peak_bytes(s, d, v, heads) / temp - 1) < 0.25, (loss_peak_bytes(s, d, v, heads), temp)
