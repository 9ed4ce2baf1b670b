"""The training state across a step: donated to the jitted step, unchanged by a non-finite
step, never clobbered in an async checkpoint by the next step; and the loop's skip counting."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.checkpoint import Checkpointer
from dsv3_jax.train import loop
from dsv3_jax.train.loop import RunConfig, TrainingError, step_fn
from dsv3_jax.train.optimizer import make_optimizer
from tests.conftest import FIXTURES

# the v3_mtp fixture cut to one dense and one MoE layer (plus MTP): every kind of state, a
# quicker compile
CFG = ModelConfig.from_json(FIXTURES / "v3_mtp").replace(num_hidden_layers=2)
STEP = step_fn(RunConfig())


def _state(seed=0):
    model = init_model(CFG, seed=seed)
    opt = nnx.Optimizer(model, make_optimizer(model, lr=1e-2, warmup_steps=1, total_steps=10),
                        wrt=nnx.Param)
    return model, opt


def _batch(seed=0):
    rows = np.random.default_rng(seed).integers(0, CFG.vocab_size, (1, 2, 17))
    return jnp.asarray(rows, jnp.int32)


def _host(model, opt):
    """Host copies of the checkpointed state: the model's and the optax state's arrays."""
    return [np.array(x) for x in jax.tree.leaves(nnx.state((model, opt.opt_state)))]


def test_compiled_step_aliases_the_whole_training_state():
    """Every byte of the parameters, routing bias and optimizer state is an input/output alias
    of the compiled step: XLA writes the new state into the old buffers."""
    model, opt = _state()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state((model, opt))))
    compiled = STEP.lower(model, opt, _batch()).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == state_bytes, state_bytes


def test_async_checkpoint_is_not_clobbered_by_the_next_donated_step(tmp_path):
    """Save (async) after step 1, run step 2 at once with the state donated: the checkpoint
    restores to step 1's state, and step 2 still computes what it would without the save."""
    step = STEP
    model, opt = _state()
    step(model, opt, _batch(0))
    after_one = _host(model, opt)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(1, model, opt, {"step": 1})
    step(model, opt, _batch(1))
    after_two = _host(model, opt)
    ckpt.wait()

    fresh, fresh_opt = _state(seed=1)
    ckpt.restore(1, fresh, fresh_opt)
    ckpt.close()
    for got, want in zip(_host(fresh, fresh_opt), after_one):
        np.testing.assert_array_equal(got, want)
    step(fresh, fresh_opt, _batch(1))  # the restored state steps to the same step-2 state
    for got, want in zip(_host(fresh, fresh_opt), after_two):
        np.testing.assert_array_equal(got, want)


# A token id past the vocabulary: under jit the embedding lookup fills it with NaN (the eager
# range check does not run), so a batch holding it has a NaN loss and NaN gradients; the data
# poison the tests inject, leaving the model itself untouched.
POISON = 2**20


def test_non_finite_step_leaves_the_state_bit_identical():
    model, opt = _state()
    everything = lambda: [np.array(x) for x in jax.tree.leaves(nnx.state((model, opt)))]  # noqa: E731
    before = everything()
    bad = np.array(_batch(0))
    bad[0, 0, 3] = POISON
    parts = STEP(model, opt, jnp.asarray(bad))
    assert int(parts["skipped"]) == 1
    assert not (np.isfinite(float(parts["loss"])) and np.isfinite(float(parts["grad_norm"])))
    for got, want in zip(everything(), before):  # params, moments, step counts, routing bias
        np.testing.assert_array_equal(got, want)
    parts = STEP(model, opt, _batch(1))
    assert int(parts["skipped"]) == 0 and np.isfinite(float(parts["loss"]))
    assert not all(np.array_equal(a, b) for a, b in zip(everything(), before))


@pytest.fixture(scope="module")
def tiny_run_config(tmp_path_factory):
    """The fixture architecture (1 dense + 1 MoE layer, MTP) with a 512-token vocabulary."""
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d.update(vocab_size=512, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_loop_skips_non_finite_steps_and_stops_after_max_skipped(tiny_run_config, tmp_path,
                                                                  monkeypatch):
    """Step 4 gets an infinite gradient under a finite loss (a checkpoint step): skipped, the
    run goes on. Steps 6 and 7 get data poison (NaN loss) with --max-skipped 2: the run stops
    at step 7 with a clear error. Every checkpoint written (steps 2, 4 and 6, the last two at
    skipped steps) restores to finite values."""
    import email
    from pathlib import Path

    from dsv3_jax.train import step as step_module

    grad_poison, data_poison = {4}, {6, 7}
    marker = 511  # the first token of a batch whose gradient is made infinite

    class Batcher(loop.data.TokenBatcher):
        calls = 0

        def next(self):
            rows = super().next()
            Batcher.calls += 1
            rows[0, 0] = marker if Batcher.calls in grad_poison else min(rows[0, 0], marker - 1)
            if Batcher.calls in data_poison:
                rows[0, 3] = POISON
            return rows

    @jax.custom_vjp
    def inf_gradient(x, flag):
        return jnp.zeros((), jnp.float32)  # adds 0 to the loss; its gradient is inf when flag

    inf_gradient.defvjp(lambda x, flag: (inf_gradient(x, flag), (x, flag)),
                        lambda res, g: (jnp.where(res[1], jnp.inf, 0.0) * jnp.ones_like(res[0]),
                                        None))
    lm_loss = step_module.lm_loss

    def poisoned_loss(model, batch, **kw):
        total, aux = lm_loss(model, batch, **kw)
        return total + inf_gradient(model.lm_head[...], batch[0, 0] == marker), aux

    monkeypatch.setattr(loop.data, "TokenBatcher", Batcher)
    monkeypatch.setattr(step_module, "lm_loss", poisoned_loss)
    run = RunConfig(config=tiny_run_config, corpus=str(Path(email.__file__).parent), steps=8,
                    batch_size=4, seq_len=32, warmup_steps=2, checkpoint_every=2, lr=1e-2,
                    out=str(tmp_path), max_skipped=2)
    with pytest.raises(TrainingError, match=r"steps 6\.\.7: 2 consecutive steps had a non-finite "
                                            r"loss or gradient norm .*--max-skipped 2.*step 6"):
        loop.train(run, log=lambda *a: None)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 0, 1, 0, 1, 1]
    assert np.isfinite(records[3]["loss"]) and records[3]["grad_norm"] == float("inf")
    assert [r["trained_tokens"] for r in records] == [128, 128, 128, 0, 128, 0, 0]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2, 4, 6]
    cfg = ModelConfig.from_json(tiny_run_config)
    for step in ckpt.all_steps():
        model = init_model(cfg)
        opt = nnx.Optimizer(model, make_optimizer(model), wrt=nnx.Param)
        ckpt.restore(step, model, opt)
        assert all(np.isfinite(np.asarray(x)).all()
                   for x in jax.tree.leaves(nnx.state((model, opt))))
    ckpt.close()
    with pytest.raises(TrainingError, match="--max-skipped 0: must be >= 1"):
        loop.train(dataclasses.replace(run, max_skipped=0, out=str(tmp_path / "z")))
