"""Acceptance: auxiliary-loss-free balancing during real training (no balance loss).

The tiny config trains on real text (the standard library's `email` package, fixed for a
Python version) from a deliberately imbalanced
gate: every token's embedding shares one direction m, and the gate rows of experts 0-3 (one
whole expert group) are tilted towards m, so at step 0 nearly every token is routed to those
four experts (max/mean load about 3.5 of a possible 4). With gamma > 0 the bias update must bring
the load on a held-out batch below 1.5 max/mean within 130 steps (1.22 measured; 1.47 after
100); with gamma = 0 it stays high.
"""


import email
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, data, init_model
from dsv3_jax.train.balance import load_imbalance
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.step import train_step
from tests.conftest import ROOT

STEPS = 130


def _skewed_model(cfg):
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    m = rng.standard_normal(cfg.hidden_size).astype(np.float32)
    m /= np.linalg.norm(m)
    model.embed_tokens.set_value(model.embed_tokens[...] + 0.05 * jnp.asarray(m))
    w = np.array(model.moe_layers.mlp.gate.weight[...])
    w[:, :, :4] += 0.4 * m[None, :, None]
    model.moe_layers.mlp.gate.weight.set_value(jnp.asarray(w))
    return model


def _imbalance_before_and_after(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer max/mean load on a held-out batch before and after STEPS steps at `gamma`."""
    cfg = ModelConfig.from_json(ROOT / "configs" / "tiny.json")
    files = data.corpus_files(str(Path(email.__file__).parent))
    tokens = data.encode_corpus(files, data.load_or_train_tokenizer(files, cfg.vocab_size))
    held_out = jnp.asarray(data.TokenBatcher(tokens, 32, 64, seed=1).next()[:, :-1])
    step = nnx.jit(lambda m, o, b: train_step(m, o, b, mtp_lambda=0.3, balance_alpha=0.0,
                                              bias_gamma=gamma))
    forward = nnx.jit(lambda m, x: m.forward(x).expert_counts)
    model = _skewed_model(cfg)
    start = np.asarray(load_imbalance(forward(model, held_out)))
    opt = nnx.Optimizer(model, make_optimizer(model, lr=3e-3, warmup_steps=10,
                                              total_steps=STEPS), wrt=nnx.Param)
    batcher = data.TokenBatcher(tokens, 8, 32, seed=0)
    for _ in range(STEPS):
        parts = step(model, opt, jnp.asarray(batcher.next()[None]))
    assert np.isfinite(float(parts["loss"]))
    return start, np.asarray(load_imbalance(forward(model, held_out)))


@pytest.mark.slow  # CI time: tests/test_train_parts.py balances the same skew by the bias rule alone
def test_bias_update_balances_a_skewed_gate_while_training():
    start, end = _imbalance_before_and_after(0.01)
    print(np.round(start, 2), np.round(end, 2))
    assert start.max() > 3.0, (start, end)  # the skew works: most tokens go to 4 of 16 experts
    assert end.max() < 1.5, (start, end)


@pytest.mark.slow
def test_without_the_bias_update_the_skew_stays():
    """The control (CI time: slow): training alone does not balance the skewed gate: no layer
    gets as balanced as the bias update makes every layer (< 1.5), and the most skewed stays
    above 3. (Training does pull the first layer down, to ~2.0 since at least bb53951: the
    earlier bound, every layer above 2.5, no longer held.)"""
    start, end = _imbalance_before_and_after(0.0)
    assert start.max() > 3.0 and end.min() > 1.5 and end.max() > 3.0, (start, end)
