"""The tiny config trained 200 steps in FP8 (emulated on CPU) vs fp32 on the same data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from tests.conftest import ROOT

CFG = ModelConfig.from_json(ROOT / "configs" / "tiny.json").replace(num_nextn_predict_layers=0)
STEPS, BATCH, SEQ = 200, 4, 64


def _markov_corpus(seed=0):
    """A Markov chain over 256 tokens with 4 equally likely successors each: the loss falls from
    ln(4096) ~ 8.3 towards ln 4 ~ 1.39, so both runs end on a comparable slope."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, 256, (256, 4))
    seqs = np.zeros((STEPS, BATCH, SEQ + 1), np.int64)
    seqs[..., 0] = rng.integers(0, 256, (STEPS, BATCH))
    choice = rng.integers(0, 4, (STEPS, BATCH, SEQ))
    for t in range(SEQ):
        seqs[..., t + 1] = succ[seqs[..., t], choice[..., t]]
    return jnp.asarray(seqs, jnp.int32)


def _train(precision: str, data) -> list[float]:
    model = init_model(CFG, seed=0, precision=precision)
    opt = nnx.Optimizer(model, optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        def loss_fn(model):
            logp = jax.nn.log_softmax(model(batch[:, :-1]))
            return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], -1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, data[i])) for i in range(STEPS)]


# CI time (~3 CPU-minutes); FP8 training on a mesh vs one device: tests/test_fp8_mesh.py
@pytest.mark.slow
def test_fp8_training_tracks_fp32():
    data = _markov_corpus()
    fp32, fp8 = _train("fp32", data), _train("fp8", data)
    end32, end8 = np.mean(fp32[-10:]), np.mean(fp8[-10:])
    assert fp32[0] > 8.0 and end32 < 2.5, (fp32[0], end32)  # it really learned
    assert np.isfinite(fp8).all()
    assert abs(end8 - end32) / end32 < 0.02, (end8, end32)
