"""The decode-sized MoE path (each row with its own expert's gathered weights) against the
grouped-matmul path, the dense all-experts oracle and the expert-parallel dispatcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig
from dsv3_jax.layers import moe as moe_lib
from dsv3_jax.layers.linear import Precision
from dsv3_jax.layers.moe import LocalDispatcher, MoE
from sharding import make_mesh
from sharding.expert_parallel import ExpertParallelDispatcher
from tests.conftest import ROOT

TINY = ModelConfig.from_json(ROOT / "configs" / "tiny.json")


def _close(a, b, tol=1e-5, what=""):
    """Max error relative to the largest magnitude (sums of rows that share an expert may add
    in another order)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    assert err <= tol, (what, err)


def _with(moe: MoE, dispatcher) -> MoE:
    gd, st = nnx.split(moe)
    m = nnx.merge(gd, st)
    m.dispatcher = dispatcher
    return m


def _value_and_grads(moe: MoE, x):
    def loss(m, x):
        y, aux = m(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, aux["expert_counts"])

    (_, (y, counts)), (g, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(moe, x)
    return y, counts, nnx.to_flat_state(nnx.state(g, nnx.Param)), dx


def _assert_same(result, reference):
    """Two `_value_and_grads` results agree: values, exact expert counts, input and weight
    gradients."""
    (y, counts, g, dx), (y0, counts0, g0, dx0) = result, reference
    _close(y, y0)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(counts0))
    _close(dx, dx0)
    for (path, a), (_, b) in zip(g, g0):
        _close(a.get_value(), b.get_value(), what=path)


@pytest.mark.parametrize("tokens", [3])
def test_per_row_path_is_the_grouped_path(tokens):
    """Values, expert counts and gradients (weights and input) of both paths, fp32."""
    moe = MoE(TINY, rngs=nnx.Rngs(1))
    assert moe.experts.per_row_fits(tokens * TINY.num_experts_per_tok)
    x = jax.random.normal(jax.random.key(tokens), (1, tokens, TINY.hidden_size))
    _assert_same(nnx.jit(_value_and_grads)(moe, x),
                 nnx.jit(_value_and_grads)(_with(moe, LocalDispatcher(per_row=False)), x))


def test_per_row_path_in_bf16_and_the_static_choice():
    """bf16 operands: the same roundings as the grouped path; the choice follows rows, the
    gathered size and FP8."""
    moe = MoE(TINY, rngs=nnx.Rngs(2), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 1, TINY.hidden_size)).astype(jnp.bfloat16)
    y, y0 = (nnx.jit(lambda m, x: m(x)[0])(m, x) for m in (moe, _with(moe, LocalDispatcher(per_row=False))))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y0, np.float32),
                               rtol=1e-2, atol=1e-3)
    e = TINY.n_routed_experts
    assert moe.experts.per_row_fits(e) and not moe.experts.per_row_fits(e + 1)
    many = nnx.eval_shape(lambda: MoE(TINY.replace(n_routed_experts=128), rngs=nnx.Rngs(0)))
    per_expert = TINY.hidden_size * TINY.moe_intermediate_size  # gathered per row and projection
    fit = moe_lib._PER_ROW_ELEMENTS // per_expert
    assert fit < 128 and many.experts.per_row_fits(fit) and not many.experts.per_row_fits(fit + 1)
    fp8 = MoE(TINY, rngs=nnx.Rngs(0), dtype=Precision(jnp.bfloat16, fp8=True))
    assert not fp8.experts.per_row_fits(1)  # block-scaled e4m3 stays on the grouped path


def test_decode_sized_batch_matches_the_expert_parallel_dispatcher():
    """4 tokens (16 rows, the per-row path on one device) against the expert-parallel dispatcher
    on 4 devices (all-to-all + grouped matmul): values, counts and gradients."""
    mesh = make_mesh("expert=4", jax.devices()[:4])
    moe = MoE(TINY, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(5), (4, 1, TINY.hidden_size))
    assert moe.experts.per_row_fits(4 * TINY.num_experts_per_tok)
    single = nnx.jit(_value_and_grads)(moe, x)
    with jax.set_mesh(mesh):
        sharded = nnx.jit(_value_and_grads)(_with(moe, ExpertParallelDispatcher(mesh)), x)
    _assert_same(single, sharded)


def test_per_row_rows_match_a_float64_reference():
    """`per_row_expert_ffn` row by row against NumPy float64 SwiGLU with that row's expert."""
    rng = np.random.default_rng(0)
    E, D, F, R = 5, 12, 7, 9
    w = [rng.standard_normal(s).astype(np.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    x = rng.standard_normal((R, D)).astype(np.float32)
    ids = rng.integers(0, E, R)
    y = moe_lib.per_row_expert_ffn([jnp.asarray(a) for a in w], jnp.asarray(x), jnp.asarray(ids),
                                   Precision(jnp.float32))
    x64, (g, u, d) = x.astype(np.float64), [a.astype(np.float64) for a in w]
    h = np.einsum("rd,rdf->rf", x64, g[ids])
    h = h / (1 + np.exp(-h)) * np.einsum("rd,rdf->rf", x64, u[ids])
    np.testing.assert_allclose(np.asarray(y), np.einsum("rf,rfd->rd", h, d[ids]), rtol=1e-5, atol=1e-5)
