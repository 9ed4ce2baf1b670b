"""Block-scaled FP8 matmul against float64 references (SPEC section 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.fp8 import QuantizedWeight, fp8_matmul, quantize_tiles, quantize_weight, reference_matmul

SHAPES = [(64, 256, 256), (37, 200, 300), (16, 7168 // 8, 576), (128, 576, 130)]


def _rel(a, ref):
    return float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_forward_error_is_in_the_e4m3_band(m, k, n):
    """Gaussian data: e4m3 (3 mantissa bits) on both operands gives ~3-4% relative error,
    far above bf16's ~0.3%, which proves the float8 path really runs."""
    rng = np.random.default_rng(m + k + n)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    ref = x @ w
    err = _rel(fp8_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)), ref)
    bf16 = _rel(reference_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.bfloat16), ref)
    assert 0.02 < err < 0.06, err
    assert bf16 < 0.01 and err > 4 * bf16


def test_outliers_only_hurt_their_own_tile():
    """Fine-grained scaling: a 1e4 outlier in one 1x128 tile leaves other rows at e4m3 accuracy."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 256)), rng.standard_normal((256, 64))
    x[0, 3] = 1e4
    y = np.asarray(fp8_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)), np.float64)
    assert np.isfinite(y).all()
    assert _rel(y[1:], x[1:] @ w) < 0.06


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_finite_for_large_and_small_inputs(scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 300)) * scale
    w = rng.standard_normal((300, 200)) * scale
    y = fp8_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert bool(jnp.isfinite(y).all())
    assert _rel(y, x @ w) < 0.06
    g = jax.grad(lambda x, w: jnp.sum(fp8_matmul(x, w)), argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert all(bool(jnp.isfinite(a).all()) for a in g)


def test_quantization_round_trip_and_partial_blocks():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((576, 200)).astype(np.float32)
    qw = quantize_weight(jnp.asarray(w))
    # held as FP8 checkpoints hold it: [out, in] values, [out / 128, in / 128] scales
    assert qw.q.dtype == jnp.float8_e4m3fn and qw.q.shape == (200, 576) and qw.scale.shape == (2, 5)
    assert qw.shape == (576, 200)
    assert _rel(qw.dequantize(), w) < 0.04
    q, s = quantize_tiles(jnp.asarray(w))
    assert q.shape == (576, 256) and s.shape == (576, 2)
    np.testing.assert_array_equal(np.asarray(q[:, 200:], np.float32), 0)


@pytest.mark.parametrize("block", [(128, 128), (16, 16)])
def test_prequantized_weight_is_used_as_stored(block):
    """An official-format weight (HF [out, in] e4m3 + scale_inv) runs without a bf16 copy and
    gives the product with its dequantized values, up to the activation's e4m3 rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 192)).astype(np.float32)
    qw = quantize_weight(jnp.asarray(rng.standard_normal((192, 576)), jnp.float32), block)
    hf = QuantizedWeight.from_checkpoint(np.asarray(qw.q), np.asarray(qw.scale), block)
    assert hf.q.dtype == jnp.float8_e4m3fn and hf.block == block and hf.shape == (192, 576)
    assert hf.q.shape == (576, 192)  # the checkpoint's [out, in], not transposed
    y = fp8_matmul(jnp.asarray(x), hf)
    ref = x.astype(np.float64) @ np.asarray(qw.dequantize(), np.float64)
    assert _rel(y, ref) < 0.04
    dx = jax.grad(lambda x: jnp.sum(fp8_matmul(x, hf) ** 2))(jnp.asarray(x))
    dx_ref = 2 * ref @ np.asarray(qw.dequantize(), np.float64).T
    assert _rel(dx, dx_ref) < 0.08


@pytest.mark.parametrize("m, k, n", SHAPES[:2])
def test_gradients_are_close_to_fp32(m, k, n):
    """dgrad and wgrad run in e4m3 too: within 8% (relative Frobenius) of the fp32 gradients."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * t)

    g8 = jax.grad(loss(fp8_matmul), argnums=(0, 1))(x, w)
    g32 = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    for a, b in zip(g8, g32):
        err = _rel(a, np.asarray(b, np.float64))
        assert 0.01 < err < 0.08, err  # > 0.01: the backward really is e4m3, not fp32


def test_leading_dims_and_dtype():
    x = jnp.ones((2, 3, 256), jnp.bfloat16)
    w = jnp.ones((256, 64), jnp.float32)
    y = fp8_matmul(x, w)
    assert y.shape == (2, 3, 64) and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), 256.0, rtol=1e-2)
    with pytest.raises(ValueError, match="x has 255 input features, w has 256 rows"):
        fp8_matmul(jnp.ones((1, 255)), w)


# ------------------------------------------------------------------ the precision switch
from flax import nnx  # noqa: E402

from dsv3_jax import ModelConfig, init_model, load_hf  # noqa: E402
from dsv3_jax.layers.linear import Precision  # noqa: E402
from dsv3_jax.layers.mlp import MLP  # noqa: E402
from dsv3_jax.layers.moe import MoE  # noqa: E402
from tests.conftest import FIXTURES, ROOT  # noqa: E402

FP8 = Precision(jnp.bfloat16, True)


def test_mlp_under_fp8_is_the_fp8_matmul_chain():
    mlp = MLP(256, 384, rngs=nnx.Rngs(0), dtype=FP8, std=0.05)
    x = jax.random.normal(jax.random.key(1), (4, 256), jnp.bfloat16)
    g = fp8_matmul(x, mlp.gate_proj[...])
    u = fp8_matmul(x, mlp.up_proj[...])
    want = fp8_matmul(jax.nn.silu(g) * u, mlp.down_proj[...])
    np.testing.assert_array_equal(np.asarray(mlp(x), np.float32), np.asarray(want, np.float32))
    bf16 = MLP(256, 384, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, std=0.05)(x)
    assert not np.array_equal(np.asarray(bf16, np.float32), np.asarray(want, np.float32))


def test_grouped_experts_under_fp8_match_per_expert_fp8_matmuls():
    """Routed experts in e4m3: each (token, expert) row equals fp8_matmul with that expert's
    weights (same 1x128 row tiles, same 128x128 blocks); gradients stay near fp32's."""
    cfg = ModelConfig.from_json(ROOT / "configs" / "tiny.json").replace(n_shared_experts=0)
    moe = MoE(cfg, rngs=nnx.Rngs(0), dtype=FP8)
    x = jax.random.normal(jax.random.key(2), (2, 16, cfg.hidden_size), jnp.bfloat16)
    y, _ = moe(x)
    xt = x.reshape(-1, cfg.hidden_size)
    r = moe.gate(xt)
    wg, wu, wd = moe.experts.weights
    # rows are quantized one by one, so running every token through an expert and picking
    # the routed rows gives exactly the per-(token, expert) products (test oracle only)
    chain = jax.jit(lambda x, g, u, d: fp8_matmul(jax.nn.silu(fp8_matmul(x, g)) * fp8_matmul(x, u), d))
    every = jnp.stack([chain(xt, wg[e], wu[e], wd[e]) for e in range(cfg.n_routed_experts)])
    picked = every[r.experts, jnp.arange(xt.shape[0])[:, None]].astype(jnp.float32)  # [t, k, d]
    want = jnp.einsum("tk,tkd->td", r.weights, picked)
    np.testing.assert_allclose(np.asarray(y, np.float32).reshape(want.shape), np.asarray(want),
                               rtol=2e-2, atol=2e-3)  # bf16 outputs of identical e4m3 products

    gd, st = nnx.split(moe)
    g8 = jax.grad(lambda s: jnp.sum(nnx.merge(gd, s)(x)[0].astype(jnp.float32) ** 2))(st)
    moe32 = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    gd32, st32 = nnx.split(moe32)
    g32 = jax.grad(lambda s: jnp.sum(nnx.merge(gd32, s)(x.astype(jnp.float32))[0] ** 2))(st32)
    for name in ("gate_proj", "up_proj", "down_proj"):
        a = np.asarray(g8["experts"][name].get_value(), np.float64)
        b = np.asarray(g32["experts"][name].get_value(), np.float64)
        assert _rel(a, b) < 0.1, (name, _rel(a, b))


def test_precision_switch_on_load_and_init():
    ref = np.load(FIXTURES / "v3_mtp" / "reference.npz")
    ids = jnp.asarray(ref["input_ids"])
    for name, dtype in [("fp32", jnp.float32), ("bf16", jnp.bfloat16), ("fp8", jnp.bfloat16)]:
        model = load_hf(FIXTURES / "v3_mtp", precision=name)
        assert model.embed_tokens.get_value().dtype == dtype
        assert model.moe_layers.mlp.experts.precision.fp8 == (name == "fp8")
        logits = nnx.jit(lambda m, x: m(x))(model, ids)
        assert bool(jnp.isfinite(logits).all())
        if name == "fp32":
            assert _rel(logits, ref["logits"]) < 1e-5
    m = init_model(ModelConfig.from_json(FIXTURES / "v3_mtp"), precision="fp8")
    assert m.embed_tokens.get_value().dtype == jnp.float32  # fp32 master weights
    assert m.dense_layers.self_attn.precision == FP8
    with pytest.raises(ValueError, match="precision 'fp16': allowed"):
        load_hf(FIXTURES / "v3_mtp", precision="fp16")


@pytest.mark.parametrize("case", [pytest.param("v3_mtp_fp8_b16", marks=pytest.mark.slow),  # CI time
                                  "v3_fp8_b128"])
def test_fp8_checkpoint_runs_as_stored(case):
    """precision='fp8' on an official-format FP8 checkpoint keeps every quantized weight as its
    e4m3 values and block scales (no bf16 copy); only unquantized tensors are bf16."""
    from dsv3_jax.fp8 import QuantizedWeight
    from dsv3_jax.safetensors_io import CheckpointReader
    from dsv3_jax.weights import key_map
    path = FIXTURES / case
    model = load_hf(path, precision="fp8")
    reader = CheckpointReader(path)
    params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    stored = 0
    for e in key_map(model.cfg):
        value = params[e.path]
        if reader.dtype(e.hf_key).name == "float8_e4m3fn":
            assert isinstance(value, QuantizedWeight) and value.q.dtype == jnp.float8_e4m3fn, e.hf_key
            # the checkpoint's bytes in the checkpoint's order: [out..., in...] values, no transpose
            q = np.asarray(value.q[e.index] if e.index else value.q)
            hf = np.asarray(reader.get(e.hf_key))
            np.testing.assert_array_equal(q.reshape(hf.shape).view(np.uint8), hf.view(np.uint8))
            s = np.asarray(value.scale[e.index] if e.index else value.scale)
            np.testing.assert_array_equal(s, reader.get(e.hf_key + "_scale_inv"))
            stored += 1
        else:
            assert not isinstance(value, QuantizedWeight) and value.dtype in (jnp.bfloat16, jnp.float32)
    assert stored >= 20
    ref = np.load(path / "reference.npz")
    ids = jnp.asarray(ref["input_ids"])
    logits = nnx.jit(lambda m, x: m(x))(model, ids)
    assert bool(jnp.isfinite(logits).all())
    # these random fixtures are chaotic (quantizing the weights alone moved transformers'
    # logits by 60%+): e4m3 activations and bf16 stay within a loose band of the fp32 reference
    assert _rel(logits, ref["logits"]) < 0.5
    grads = nnx.jit(nnx.grad(lambda m, x: m(x).mean()))(model, ids)
    for p, v in nnx.to_flat_state(grads):
        leaves = jax.tree.leaves(v.get_value())
        assert all(bool(jnp.isfinite(jnp.asarray(a, jnp.float32)).all()) for a in leaves), p


@pytest.mark.parametrize("magnitude", [1e-2, 1e-6, 1e-9, 1e-10, 1e-11, 1e-12])
def test_small_gradients_keep_e4m3_accuracy(magnitude):
    """dx and dW through the FP8 backward keep e4m3 accuracy (~4%) however small the incoming
    gradient: gradients have their own amax floor (2^-100), not the activations' 1e-4, which
    flushed tiles below ~1e-9 toward zero (95% error at 1e-10)."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((256, 384)), rng.standard_normal((384, 256))
    dy = rng.standard_normal((256, 256)) * magnitude
    _, vjp = jax.vjp(fp8_matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    assert _rel(dx, dy @ w.T) < 0.05, magnitude
    assert _rel(dw, x.T @ dy) < 0.05, magnitude


# --- structured scales: every tile and block with its own magnitude --------------------------
def _structured(rows, cols, tile_rows, tile_cols, seed):
    """Gaussian values, each (tile_rows x tile_cols) tile scaled by its own power of ten (1e-6
    .. 1e3), plus one 1e4 outlier: a mis-indexed scale, or a scale per row instead of per tile,
    puts some tile off by orders of magnitude."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols))
    powers = rng.integers(-6, 4, (-(-rows // tile_rows), -(-cols // tile_cols)))
    x *= np.repeat(np.repeat(10.0 ** powers, tile_rows, 0), tile_cols, 1)[:rows, :cols]
    x[rows // 2, cols // 3] = 1e4
    return x.astype(np.float32)


def _dq_tiles(a, floor=None):
    """float64 of what quantize_tiles keeps: 1 x 128 tiles along the last axis."""
    from dsv3_jax.fp8 import _MIN_AMAX_GRAD
    args = () if floor is None else (128, _MIN_AMAX_GRAD)
    q, s = quantize_tiles(jnp.asarray(a), *args)
    d = np.asarray(q, np.float64) * np.repeat(np.asarray(s, np.float64), 128, 1)
    return d[:, :a.shape[1]]


def _close(a, ref):
    np.testing.assert_allclose(np.asarray(a, np.float64), ref, rtol=2e-5,
                               atol=2e-6 * np.abs(ref).max())


def test_structured_scales_dense_forward_and_gradients_equal_the_dequantized_product():
    """fp8_matmul's forward, dx and dW equal the float64 products of the dequantized e4m3
    operands (the quantization is deterministic: this is an equality up to fp32 summation)."""
    m, k, n = 256, 384, 320  # K and N not multiples of each other; 2 token tiles
    x = _structured(m, k, 1, 128, 0)           # per 1 x 128 activation tile
    w = _structured(k, n, 128, 128, 1)         # per 128 x 128 weight block
    dy = _structured(m, n, 1, 128, 2) * 1e-8   # small gradients, own magnitude per tile
    qw = quantize_weight(jnp.asarray(w))
    wd = np.asarray(qw.dequantize(), np.float64)
    y, vjp = jax.vjp(fp8_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    _close(y, _dq_tiles(x) @ wd)
    # dgrad: dy in 1 x 128 tiles along N against the same weight blocks
    _close(dx, _dq_tiles(dy, "grad") @ wd.T)
    # wgrad: x^T and dy^T each in 1 x 128 tiles along the tokens
    _close(dw, _dq_tiles(x.T) @ _dq_tiles(dy.T, "grad").T)


def test_structured_scales_grouped_forward_and_gradients_equal_the_dequantized_products():
    """The grouped expert path in FP8: each row against its own expert's blocks, each tile of
    rows with its own scales: forward, dx and dW per expert equal the dequantized products."""
    from dsv3_jax.layers import grouped_matmul as gm
    groups, k, n, tile = 3, 256, 256, 128
    ids = np.array([0] * 100 + [2] * 150 + [1] * 6)
    rows = len(ids)
    x = _structured(rows, k, 1, 128, 3)
    w = np.stack([_structured(k, n, 128, 128, 10 + g) for g in range(groups)])
    dy = _structured(rows, n, 1, 128, 4) * 1e-9
    layout = gm.make_layout(jnp.asarray(ids), groups, tile=tile)

    def f(x, w):
        buf = gm.scatter_rows(x, layout)
        return gm.gather_rows(gm.grouped_matmul(buf, w, layout, jnp.float32, fp8=True), layout)

    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    xd, dyd = _dq_tiles(x), _dq_tiles(dy, "grad")
    for g in range(groups):
        rows_g = np.flatnonzero(ids == g)
        wd = np.asarray(quantize_weight(jnp.asarray(w[g])).dequantize(), np.float64)
        _close(np.asarray(y)[rows_g], xd[rows_g] @ wd)
        _close(np.asarray(dx)[rows_g], dyd[rows_g] @ wd.T)
        # dW[g]: the expert's rows in tiles of `tile` rows (its group starts a new tile)
        xg, dyg = np.zeros((-(-len(rows_g) // tile) * tile, k), np.float32), None
        xg[:len(rows_g)] = x[rows_g]
        dyg = np.zeros((len(xg), n), np.float32)
        dyg[:len(rows_g)] = dy[rows_g]
        _close(np.asarray(dw)[g], _dq_tiles(xg.T) @ _dq_tiles(dyg.T, "grad").T)


def test_structured_scales_every_tile_and_block_keeps_its_own_precision():
    """The quantizers alone, against the input: with tiles / blocks of magnitudes 1e-6 .. 1e4
    side by side, every 1 x 128 activation tile and every 128 x 128 weight block comes back
    within e4m3's relative error; one amax per row or per tensor would flush the small ones."""
    x = _structured(64, 384, 1, 128, 5)
    xd = _dq_tiles(x).reshape(64, 3, 128)
    xt = x.reshape(64, 3, 128).astype(np.float64)
    err = np.linalg.norm(xd - xt, axis=-1) / np.linalg.norm(xt, axis=-1)
    assert err.max() < 0.07, err.max()
    w = _structured(384, 256, 128, 128, 6)
    wd = np.asarray(quantize_weight(jnp.asarray(w)).dequantize(), np.float64)
    blocks = lambda a: a.reshape(3, 128, 2, 128).transpose(0, 2, 1, 3).reshape(6, -1)  # noqa: E731
    err = np.linalg.norm(blocks(wd) - blocks(w), axis=-1) / np.linalg.norm(blocks(w), axis=-1)
    assert err.max() < 0.07, err.max()
