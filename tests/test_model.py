"""Whole-model behaviour that needs no fixture: scanned depth, dtypes, input errors, MTP shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, Transformer, init_model
from tests.conftest import ROOT

TINY = ModelConfig.from_json(ROOT / "configs" / "tiny.json")


def _jaxpr_size(cfg):
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    gd, st = nnx.split(model)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda st, ids: nnx.merge(gd, st)(ids))(st, ids)
    return len(jaxpr.jaxpr.eqns), str(jaxpr).count("scan[")


def test_layers_are_scanned_so_program_size_is_flat_in_depth():
    shallow = _jaxpr_size(TINY.replace(num_hidden_layers=3))
    deep = _jaxpr_size(TINY.replace(num_hidden_layers=24))
    assert shallow == deep and shallow[1] >= 2, (shallow, deep)


def test_forward_shapes_mtp_and_counts():
    model = init_model(TINY)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12)), jnp.int32)
    out = nnx.jit(lambda m, ids: m.forward(ids, mtp=True))(model, ids)
    assert out.logits.shape == (2, 12, TINY.vocab_size) and out.logits.dtype == jnp.float32
    assert [m.shape for m in out.mtp_logits] == [(2, 11, TINY.vocab_size)]
    assert out.expert_counts.shape == (TINY.num_moe_layers, TINY.n_routed_experts)
    np.testing.assert_array_equal(out.expert_counts.sum(1), 2 * 12 * TINY.num_experts_per_tok)
    assert out.mtp_expert_counts.shape == (1, TINY.n_routed_experts)
    np.testing.assert_allclose(model(ids), out.logits, rtol=1e-6, atol=1e-6)  # eager == jit


def test_causality():
    """Changing a later token never changes earlier logits."""
    model = init_model(TINY, seed=1)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 10))
    ids2 = ids.copy()
    ids2[0, 7] = (ids2[0, 7] + 1) % TINY.vocab_size
    a, b = model(jnp.asarray(ids, jnp.int32)), model(jnp.asarray(ids2, jnp.int32))
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_bf16_compute_is_finite_and_close_to_fp32():
    m32 = init_model(TINY, seed=2)
    m16 = init_model(TINY, seed=2, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)), jnp.int32)
    a, b = m32(ids), m16(ids)
    assert b.dtype == jnp.float32 and bool(jnp.isfinite(b).all())
    # bf16 rounding (~1% for this depth) plus a few routing flips near expert-score ties
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 0.1


def test_jit_and_grad_through_the_model():
    model = init_model(TINY.replace(num_nextn_predict_layers=0), remat=True)
    gd, st = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 8)), jnp.int32)

    @jax.jit
    def loss(st):
        logits = nnx.merge(gd, st)(ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    grads = jax.grad(loss)(st)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


@pytest.mark.parametrize("bad", [-1, TINY.vocab_size])
def test_token_ids_out_of_range(bad):
    model = init_model(TINY.replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        model(jnp.asarray([[1, 2, bad]], jnp.int32))


def test_large_weights_are_drawn_on_the_devices_shard_by_shard(monkeypatch):
    """Weights past DEVICE_DRAW_ELEMENTS never exist whole on the host (671B: 870 GB expert
    stacks): they are drawn on the devices into their shards, with the same values and scale
    on any mesh."""
    from dsv3_jax import model as model_lib
    from sharding import make_mesh
    from sharding.rules import variable_sharding

    limit = 1 << 15
    monkeypatch.setattr(model_lib, "DEVICE_DRAW_ELEMENTS", limit)
    placed = []
    real_place = model_lib.place
    monkeypatch.setattr(model_lib, "place", lambda v, var, mesh: placed.append(v.size) or
                        real_place(v, var, mesh))
    cfg = TINY.replace(num_hidden_layers=2)
    mesh = make_mesh("data=2,expert=4")
    sharded, single = init_model(cfg, seed=0, mesh=mesh), init_model(cfg, seed=0)
    assert max(placed) < limit  # nothing large went through the host
    big = 0
    for (path, v), (_, w) in zip(nnx.to_flat_state(nnx.state(sharded)),
                                 nnx.to_flat_state(nnx.state(single))):
        x = v.get_value()
        assert x.sharding == variable_sharding(v, mesh), path
        np.testing.assert_allclose(np.asarray(x), np.asarray(w.get_value()), rtol=1e-6, atol=1e-6)
        if x.size >= limit:
            big += 1
            assert abs(np.asarray(x).std() / v.get_metadata()["init_std"] - 1) < 0.05, path
    assert big >= 3  # embedding, head, routed-expert stacks


def test_init_model_matches_the_module_initialisers():
    """init_model (NumPy, fast) draws what Transformer(rngs=...) draws: same shapes and scales."""
    cfg = TINY.replace(num_hidden_layers=2)
    a = nnx.state(init_model(cfg, seed=0))
    b = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        x, y = np.asarray(va.get_value()), np.asarray(vb.get_value())
        assert pa == pb and x.shape == y.shape and x.dtype == y.dtype
        assert va.get_metadata()["logical_axes"] == vb.get_metadata()["logical_axes"]
        if "init_std" in va.get_metadata():
            assert abs(x.std() / y.std() - 1) < 0.1, pa
        else:
            np.testing.assert_array_equal(x, y)
