"""orbax checkpoints: exact round trip of model, optimizer and extra state; keep-K; resharding."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.checkpoint import Checkpointer, CheckpointRestoreError
from dsv3_jax.train.losses import lm_loss
from dsv3_jax.train.optimizer import make_optimizer
from sharding import make_mesh
from tests.conftest import FIXTURES

CFG = ModelConfig.from_json(FIXTURES / "v3_mtp")
BATCH = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 9)), jnp.int32)


def _setup(mesh=None):
    model = init_model(CFG, seed=0, mesh=mesh)
    opt = nnx.Optimizer(model, make_optimizer(model, lr=1e-2, warmup_steps=1, total_steps=10),
                        wrt=nnx.Param)
    return model, opt


@nnx.jit
def _step(model, opt, batch):
    (loss, _), grads = nnx.value_and_grad(lambda m: lm_loss(m, batch), has_aux=True)(model)
    opt.update(model, grads)
    return loss


def _flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(tree)))]


@pytest.mark.slow  # CI time: test_train_loop.py resumes exactly after a SIGKILL by default
def test_round_trip_resumes_identically(tmp_path):
    model, opt = _setup()
    for _ in range(3):
        _step(model, opt, BATCH)
    model.moe_layers.mlp.gate.e_score_correction_bias.set_value(
        jnp.full(model.moe_layers.mlp.gate.e_score_correction_bias.shape, 0.25))
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(3, model, opt, {"step": 3, "data": {"position": 17}})
    ckpt.wait()
    next_loss = float(_step(model, opt, BATCH))

    fresh, fresh_opt = _setup()
    extra = ckpt.restore(None, fresh, fresh_opt)
    assert extra == {"step": 3, "data": {"position": 17}}
    np.testing.assert_array_equal(fresh.moe_layers.mlp.gate.e_score_correction_bias.get_value(), 0.25)
    assert float(_step(fresh, fresh_opt, BATCH)) == next_loss
    for a, b in zip(_flat(model), _flat(fresh)):
        np.testing.assert_array_equal(a, b)
    ckpt.close()


def test_keeps_the_last_k(tmp_path):
    model, opt = _setup()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    model, opt = _setup()
    _step(model, opt, BATCH)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model, opt, {})
    ckpt.wait()
    mesh = make_mesh("data=2,expert=4")
    sharded, sharded_opt = _setup(mesh)
    ckpt.restore(1, sharded, sharded_opt)
    experts = sharded.moe_layers.mlp.experts.gate_proj.get_value()
    assert not experts.sharding.is_fully_replicated
    for a, b in zip(_flat(model), _flat(sharded)):
        np.testing.assert_array_equal(a, b)
    ckpt.close()


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    model, opt = _setup()
    with pytest.raises(CheckpointRestoreError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty").restore(None, model, opt)
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(5, model, opt, {})
    ckpt.wait()
    for f in (tmp_path / "c" / "5" / "model").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    shutil.rmtree(tmp_path / "c" / "5" / "extra", ignore_errors=True)
    with pytest.raises(CheckpointRestoreError, match="step 5 .* cannot be restored"):
        Checkpointer(tmp_path / "c").restore(5, model, opt)
