"""The paper's training recipe pinned against independent formulas: the complementary
sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20), gradient clipping at global norm
1.0, the learning-rate schedule (linear warmup, cosine decay to 10%)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.layers.moe import MoE
from dsv3_jax.train.optimizer import lr_schedule, make_optimizer
from tests.conftest import FIXTURES

CFG = ModelConfig.from_json(FIXTURES / "v3_mtp")


def _balance_numpy(x, w, k):
    """Eqs. 17-20 in float64, per sequence, then the mean over sequences: s = sigmoid(x W);
    f_i = E / (K T) * #{t: i in TopK(s_t)}; P_i = 1/T sum_t s_it / sum_j s_jt; sum_i f_i P_i."""
    b, t, _ = x.shape
    e = w.shape[1]
    s = 1 / (1 + np.exp(-(x.astype(np.float64) @ w.astype(np.float64))))  # [b, t, e]
    top = np.argsort(-s, axis=-1)[..., :k]
    chosen = np.zeros((b, t, e))
    np.put_along_axis(chosen, top, 1.0, axis=-1)
    f = e / (k * t) * chosen.sum(1)
    p = (s / s.sum(-1, keepdims=True)).mean(1)
    return float(np.mean(np.sum(f * p, axis=-1)))


def test_sequence_balance_matches_the_paper_formula():
    # one expert group: the top-k is a plain argsort in NumPy (group-limited routing is the
    # gate's concern, tested in tests/test_layers.py)
    cfg = CFG.replace(n_group=1, topk_group=1)
    moe = MoE(cfg, rngs=nnx.Rngs(3))
    x = np.random.default_rng(0).standard_normal((3, 10, cfg.hidden_size)).astype(np.float32)
    moe.gate.weight.set_value(moe.gate.weight[...] * 50)  # a skewed gate: the term far from 1
    _, aux = moe(jnp.asarray(x))
    want = _balance_numpy(x, np.asarray(moe.gate.weight[...]), cfg.num_experts_per_tok)
    assert abs(float(aux["balance"]) - want) < 1e-5 * want, (float(aux["balance"]), want)
    assert want > 1.05  # not the uniform 1.0: a wrong normalisation would show


def test_gradient_clipping_is_active_at_global_norm_one():
    """AdamW's first moment after one step is (1 - beta1) * the clipped gradient: the gradient
    scaled to norm 1.0 when its norm is above 1.0, unchanged below."""
    model = init_model(CFG.replace(num_nextn_predict_layers=0, num_hidden_layers=2), seed=0)
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(model, lr=1e-3, warmup_steps=1, total_steps=10)
    rng = np.random.default_rng(0)
    raw = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    norm = float(optax.tree.norm(raw))
    first_step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[1])
    for scale in (10.0 / norm, 0.5 / norm):  # global norms 10 and 0.5
        grads = jax.tree.map(lambda g: g * scale, raw)
        state = first_step(grads, params)
        mu = [s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
            s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
        factor = min(1.0, 1.0 / (norm * scale))
        for m, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(m), 0.1 * factor * np.asarray(g), rtol=1e-5,
                                       atol=1e-12)


def test_lr_schedule_shape():
    """0 at step 0, linear to the peak at the end of warmup, cosine down to 10% of the peak at
    the last step, held after it."""
    lr, warmup, total = 3e-3, 50, 1000
    schedule = lr_schedule(lr, warmup, total)

    def want(t):
        if t < warmup:
            return lr * t / warmup
        t = min(t, total)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))

    for t in (0, 1, 25, 49, 50, 51, 300, 525, 999, 1000, 1500):
        assert abs(float(schedule(t)) - want(t)) < 1e-6 * lr, t
    values = np.array([float(schedule(t)) for t in range(0, total + 1, 10)])
    peak = warmup // 10
    assert (np.diff(values[:peak + 1]) > 0).all() and (np.diff(values[peak:]) < 0).all()
    assert float(schedule(total)) == np.float32(0.1 * lr)
