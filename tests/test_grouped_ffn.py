"""The fused routed-expert SwiGLU (one tile loop) against the three grouped matmuls it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.layers import grouped_matmul as gm
from dsv3_jax.layers.grouped_ffn import grouped_ffn, swiglu


def _problem(rows=70, groups=6, d=24, f=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, groups, rows))
    valid = jnp.asarray(rng.random(rows) > 0.15)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
          for s in ((groups, d, f), (groups, d, f), (groups, f, d))]
    return ids, valid, x, ws


def _run(ffn, x, ws, ids, valid, groups, tile, dtype):
    layout = gm.make_layout(ids, groups, tile=tile, valid=valid)
    return gm.gather_rows(ffn(gm.scatter_rows(x, layout), *ws, layout, dtype), layout)


def _three(xs, w_gate, w_up, w_down, layout, dtype):
    def mm(a, w):
        return gm.grouped_matmul(a, w, layout, dtype)
    return mm(swiglu(mm(xs, w_gate), mm(xs, w_up)), w_down)


@pytest.mark.parametrize("tile,chunk_elements", [(8, 1 << 18), (8, 1), (16, 3000)])
def test_fused_equals_three_grouped_matmuls_fp32(tile, chunk_elements, monkeypatch):
    """Bit for bit in fp32, forward and all gradients; with one tile per chunk and with chunks
    whose last one overlaps the one before (clamped start)."""
    monkeypatch.setitem(gm._CHUNK_ELEMENTS, "cpu", chunk_elements)
    ids, valid, x, ws = _problem()
    args = (ids, valid, 6, tile, jnp.float32)

    def loss(ffn):
        return lambda x, *ws: jnp.sum(jnp.sin(_run(ffn, x, ws, *args)))

    y_fused, y_three = (jax.jit(lambda x, *w, f=f: _run(f, x, w, *args))(x, *ws)
                        for f in (grouped_ffn, _three))
    np.testing.assert_array_equal(np.asarray(y_fused), np.asarray(y_three))
    g_fused, g_three = (jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3)))(x, *ws)
                        for f in (grouped_ffn, _three))
    for a, b in zip(g_fused, g_three):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # rows not routed (valid=False) get neither output nor gradient
    assert not np.asarray(y_fused)[~np.asarray(valid)].any()
    assert not np.asarray(g_fused[0])[~np.asarray(valid)].any()


def test_fused_bf16_against_float64_oracle():
    """bf16 operands, fp32 accumulation: forward and gradients near a float64 NumPy oracle, as
    close as the three-matmul composition is."""
    ids, valid, x, ws = _problem(rows=64, groups=4, d=32, f=16, seed=1)
    args = (ids, valid, 4, 8, jnp.bfloat16)
    xn, wn = np.asarray(x, np.float64), [np.asarray(w, np.float64) for w in ws]
    e, m = np.asarray(ids), np.asarray(valid)[:, None]
    g = np.einsum("rd,rdf->rf", xn, wn[0][e])
    u = np.einsum("rd,rdf->rf", xn, wn[1][e])
    h = g / (1 + np.exp(-g)) * u
    ref = np.einsum("rf,rfd->rd", h, wn[2][e]) * m
    for ffn in (grouped_ffn, _three):
        y = np.asarray(_run(ffn, x, ws, *args), np.float64)
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < 2e-2, (ffn.__name__, err)
    dw_down = [np.asarray(jax.grad(lambda w2, f=f: jnp.sum(_run(f, x, [ws[0], ws[1], w2], *args)
                                                            .astype(jnp.float32)))(ws[2]))
               for f in (grouped_ffn, _three)]
    np.testing.assert_allclose(dw_down[0], dw_down[1], rtol=2e-2, atol=2e-2)


def test_expert_ffn_with_ours_is_one_loop_forward_and_backward():
    """With ours the routed experts' FFN compiles to one tile loop forward and one backward
    (not three and six), so a regression to the separate grouped matmuls shows here; with the
    CPU BLAS kernel it is nine custom calls (three products, their dgrads and wgrads), no loop."""
    from dsv3_jax.layers import cpu_gmm, platform_gmm
    from dsv3_jax.layers.linear import as_precision
    from dsv3_jax.layers.moe import expert_ffn
    ids, valid, x, ws = _problem()
    layout = gm.make_layout(ids, 6, tile=8, valid=valid)
    xs = gm.scatter_rows(x, layout)

    def loss(xs, *ws):
        return jnp.sum(expert_ffn(ws, xs, layout, as_precision(jnp.float32)) ** 2)

    def hlo(impl):
        with platform_gmm.implementation(impl):
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(xs, *ws).as_text()

    assert hlo("ours").count("stablehlo.while") == 2, hlo("ours").count("stablehlo.while")
    if cpu_gmm.available():
        text = hlo("blas")
        assert text.count("stablehlo.while") == 0
        assert text.count("stablehlo.custom_call @dsv3_grouped_gemm") == 9
