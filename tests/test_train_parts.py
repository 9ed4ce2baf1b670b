"""Training building blocks: the loss parts, the bias update rule, the optimizer's decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.train.balance import bias_step, load_imbalance, update_routing_bias
from dsv3_jax.train.losses import lm_loss
from dsv3_jax.train.optimizer import decay_mask, make_optimizer
from tests.conftest import FIXTURES

CFG = ModelConfig.from_json(FIXTURES / "v3_mtp")


def _np_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))


def test_loss_parts_and_mtp_alignment():
    model = init_model(CFG, seed=0)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 17)), jnp.int32)
    total, (parts, _) = nnx.jit(lambda m, b: lm_loss(m, b, mtp_lambda=0.3, balance_alpha=0.01))(model, batch)
    out = nnx.jit(lambda m, x: m.forward(x, mtp=True))(model, batch[:, :-1])  # the logits
    tgt = np.asarray(batch[:, 1:])
    assert abs(float(parts["ce"]) - _np_ce(out.logits, tgt)) < 1e-5
    # MTP depth 1 at position i predicts token i + 2 = targets[:, 1:]
    assert abs(float(parts["mtp"]) - _np_ce(out.mtp_logits[0], tgt[:, 1:])) < 1e-5
    # the balance loss sums the main MoE layers' terms and the MTP depth's MoE layer's term
    balance = float(out.balance.sum()) + float(out.mtp_balance.sum())
    assert out.mtp_balance.shape == (1,) and float(out.mtp_balance[0]) > 0.5
    assert abs(float(parts["balance"]) - balance) < 1e-6
    want = _np_ce(out.logits, tgt) + 0.3 * _np_ce(out.mtp_logits[0], tgt[:, 1:]) + 0.01 * balance
    assert abs(float(total) - want) < 1e-5
    # balance term: E / (K T) * counts . mean normalised scores; 1.0 means uniform
    assert out.balance.shape == (CFG.num_moe_layers,) and bool((out.balance > 0.5).all())


def test_bias_step_rule():
    counts = jnp.asarray([[10, 0, 5, 5], [4, 4, 4, 4]])
    new = bias_step(jnp.zeros((2, 4)), counts, 0.001)
    np.testing.assert_allclose(np.asarray(new), [[-0.001, 0.001, 0, 0], [0, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(load_imbalance(counts)), [2.0, 1.0])


def test_bias_updates_balance_a_skewed_gate_without_training():
    """Repeated forward + bias update on fixed data: max/mean load falls (gamma > 0 only)."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (8, 32)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m.forward(x, mtp=True))
    result = {}
    for gamma in (0.0, 0.01):
        model = init_model(CFG, seed=0)
        bias = model.moe_layers.mlp.gate.e_score_correction_bias
        skew = np.zeros(bias.shape, np.float32)
        skew[:, :4] = 0.3  # most tokens start on 4 experts
        bias.set_value(jnp.asarray(skew))
        start = float(load_imbalance(fwd(model, ids).expert_counts).max())
        for _ in range(60):
            out = fwd(model, ids)
            update_routing_bias(model, out.expert_counts, out.mtp_expert_counts, gamma)
        result[gamma] = (start, float(load_imbalance(fwd(model, ids).expert_counts).max()))
    assert result[0.0][1] == result[0.0][0] > 2.0, result
    assert result[0.01][1] < 1.5 < result[0.01][0], result


def test_optimizer_decays_matrices_only_and_never_touches_the_bias():
    model = init_model(CFG.replace(num_nextn_predict_layers=0), seed=0)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    flat = dict(zip(paths, jax.tree.leaves(decay_mask(model))))
    assert flat["moe_layers.mlp.experts.gate_proj"] and flat["embed_tokens"] and flat["lm_head"]
    assert flat["moe_layers.self_attn.o_proj"] and flat["moe_layers.mlp.gate.weight"]
    assert not any(v for k, v in flat.items() if "layernorm" in k or k == "norm.weight")
    assert not any("e_score_correction_bias" in k for k in flat)
    opt = nnx.Optimizer(model, make_optimizer(model, lr=1e-2, warmup_steps=1, total_steps=10), wrt=nnx.Param)
    bias_before = np.asarray(model.moe_layers.mlp.gate.e_score_correction_bias.get_value())
    w_before = np.asarray(model.moe_layers.self_attn.o_proj.get_value())
    batch = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)

    @nnx.jit
    def step(model, opt, batch):
        (loss, _), grads = nnx.value_and_grad(lambda m: lm_loss(m, batch), has_aux=True)(model)
        opt.update(model, grads)
        return loss

    step(model, opt, batch)  # step 0 of the warmup has learning rate 0
    step(model, opt, batch)
    assert not np.array_equal(w_before, np.asarray(model.moe_layers.self_attn.o_proj.get_value()))
    np.testing.assert_array_equal(bias_before, np.asarray(model.moe_layers.mlp.gate.e_score_correction_bias.get_value()))


def test_flops_per_token_matches_the_report():
    """DeepSeek-V3: 37B activated parameters (ours: matmul weights 36.6B + the 0.9B embedding
    lookup) and ~250 GFLOPs per training token at 4K context."""
    from dsv3_jax.train.flops import activated_matmul_params, flops_per_token, mfu
    v3 = ModelConfig.from_json(FIXTURES.parent.parent.parent / "configs" / "deepseek-v3-671b.json")
    v3 = v3.replace(num_nextn_predict_layers=0)
    embed = v3.vocab_size * v3.hidden_size
    assert 36.5e9 < activated_matmul_params(v3) + embed < 38e9
    assert 240e9 < flops_per_token(v3, 4096) < 260e9
    assert mfu(1000.0, v3, 4096) is None  # CPU: no known peak


@pytest.mark.slow  # CI time: tests/test_packing.py checks accumulated micro-batches' normalisation
def test_accumulated_step_equals_one_big_step_and_moves_the_bias_once():
    """accumulate=2 over two halves == one batch: same loss, parameters, and ONE bias update
    from the step's total expert counts (the bias is constant inside the step)."""
    from dsv3_jax.train.step import train_step
    batch = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (4, 17)), jnp.int32)
    gamma = 0.05
    runs = {}
    for k in (1, 2):
        model = init_model(CFG, seed=0)
        counts = nnx.jit(lambda m, x: m.forward(x[:, :-1], mtp=True))(model, batch)
        opt = nnx.Optimizer(model, make_optimizer(model, lr=1e-2, warmup_steps=0, total_steps=10),
                            wrt=nnx.Param)
        step = nnx.jit(lambda m, o, b: train_step(m, o, b, bias_gamma=gamma))
        parts = step(model, opt, batch.reshape(k, 4 // k, 17))
        bias = model.moe_layers.mlp.gate.e_score_correction_bias.get_value()
        np.testing.assert_allclose(
            np.asarray(bias), np.asarray(bias_step(jnp.zeros_like(bias), counts.expert_counts, gamma)),
            atol=1e-7)
        mtp_bias = model.mtp[0].block.mlp.gate.e_score_correction_bias.get_value()
        np.testing.assert_allclose(
            np.asarray(mtp_bias),
            np.asarray(bias_step(jnp.zeros_like(mtp_bias), counts.mtp_expert_counts[0], gamma)), atol=1e-7)
        runs[k] = (float(parts["loss"]), np.asarray(model.moe_layers.self_attn.o_proj.get_value()))
    assert abs(runs[1][0] - runs[2][0]) < 1e-5 * abs(runs[1][0])
    np.testing.assert_allclose(runs[2][1], runs[1][1], rtol=1e-4, atol=1e-6)


def _layer_scans(jaxpr, length):
    """`unroll` of every scan over `length` iterations in a jaxpr (sub-jaxprs included)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == length:
            found.append(eqn.params["unroll"])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _layer_scans(sub, length)
    return found


def test_training_step_unrolls_the_layer_loop_on_cpu_and_inference_keeps_it():
    from dsv3_jax.train.step import train_step
    cfg = ModelConfig.from_json(FIXTURES.parent.parent.parent / "configs" / "tiny.json")
    model = init_model(cfg, seed=0)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    ids = jnp.zeros((1, 2, 17), jnp.int32)
    opt = nnx.Optimizer(model, make_optimizer(model), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def step(state, ids):
        m, o = nnx.merge(graphdef, state)
        return train_step(m, o, ids)

    trained = _layer_scans(jax.make_jaxpr(step)(state, ids).jaxpr, moe_layers)
    assert trained and all(u in (True, moe_layers) for u in trained), trained
    forward = _layer_scans(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)[0](x))(
        state, ids[0, :, :-1]).jaxpr, moe_layers)
    assert forward and all(u in (1, False) for u in forward), forward


def test_held_out_loss_is_the_mean_over_every_scored_prediction():
    """`evaluate` on packed conversations (segment ids, the assistant mask, batches holding
    different numbers of scored tokens, an empty padding row) equals each conversation run on
    its own: the NLL of its assistant tokens, summed over all and divided by their count."""
    from dsv3_jax.conversations import Conversation
    from dsv3_jax.train.evaluate import evaluate, held_out_conversations
    model = init_model(CFG.replace(num_hidden_layers=2), seed=0)
    rng = np.random.default_rng(0)
    convs = []
    for i in range(7):
        n = int(rng.integers(6, 20))
        mask = (np.arange(n) >= rng.integers(2, n - 1)).astype(np.int32)  # a prompt, then a reply
        convs.append(Conversation(rng.integers(3, CFG.vocab_size, n).astype(np.int32), mask, f"{i}"))
    batches = held_out_conversations(convs, 2, 31, pad_id=1)
    assert len(batches) >= 2 and not batches[-1][1][-1].any()  # the last batch ends with padding
    got = evaluate(model, [tuple(jnp.asarray(x)[None] for x in b) for b in batches])["eval_loss"]
    logits = nnx.jit(lambda m, x: m(x))
    total, count = 0.0, 0
    for c in convs:
        ids = np.zeros((1, 32), np.int32)
        ids[0, :len(c.ids)] = c.ids  # causal: what follows the conversation changes nothing
        out = np.asarray(logits(model, jnp.asarray(ids)), np.float64)[0]
        logp = out - (np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1)) + out.max(-1))[:, None]
        for i in range(len(c.ids) - 1):
            if c.mask[i + 1]:
                total, count = total - logp[i, c.ids[i + 1]], count + 1
    assert abs(got - total / count) < 1e-5 * (total / count), (got, total / count)


def test_clip_by_global_norm_is_optaxs_up_to_rounding():
    """Our clip (one factor multiplied in) against optax's (a division): the same state, norms
    under the limit untouched bit for bit, over it scaled to the limit."""
    from dsv3_jax.train.optimizer import clip_by_global_norm
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    ours, ref = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert ours.init(tree) == ref.init(tree)
    for scale in (1e-2, 10.0):
        t = jax.tree.map(lambda x: x * scale, tree)
        got, want = ours.update(t, ours.init(t))[0], ref.update(t, ref.init(t))[0]
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
        if scale < 1:
            assert all(np.array_equal(g, x) for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(t)))
        else:
            assert abs(float(optax.tree.norm(got)) - 1.0) < 1e-6
