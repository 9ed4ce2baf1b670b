"""Pipeline schedules (1f1b, zb, dualpipev, and gpipe through the same executor) against the
single-device model, on 8 CPU devices: same loss and parts, per-parameter gradients (rel
1e-5, fp32), expert counts (exactly) and MTP terms; and 10 training steps (train.py's loop).

Stacks: the v3_mtp fixture with a 512-token vocabulary; 1 dense + 6 MoE layers split evenly
over 2 stages and unevenly over 4 (2 layers before the pipeline) and over dualpipev's 4
chunks of pipeline=2 (2 before); 1 dense + 8 MoE layers for dualpipev's 8 chunks of
pipeline=4 (even). The non-slow part: 1F1B on pipeline=2,expert=4, gradients without MTP (CI
time: its 10 training steps with MTP are slow, as tests/test_pipeline.py trains GPipe through
train.py's loop); `pytest -m slow` runs every schedule on both acceptance meshes.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.train.losses import lm_loss
from dsv3_jax.train.loop import RunConfig, TrainingError, train
from sharding import make_mesh
from sharding.pipeline import PipelineError
from sharding.scheduled_pipeline import pipeline_lm_loss
from tests.conftest import FIXTURES

BASE = ModelConfig.from_json(FIXTURES / "v3_mtp").replace(vocab_size=512)
LAYERS = {"pipeline=2,expert=4": {"dualpipev": 7}, "pipeline=4,data=2": {"dualpipev": 9}}
MICRO = {"pipeline=2,expert=4": 4, "pipeline=4,data=2": 8}   # M = 2P
ROWS = 16
FAST = {("1f1b", "pipeline=2,expert=4")}
CASES = [pytest.param(s, m, marks=() if (s, m) in FAST else pytest.mark.slow, id=f"{s}-{m}")
         for m in MICRO for s in ("1f1b", "zb", "dualpipev", "gpipe")]


def _cfg(schedule, mesh):
    return BASE.replace(num_hidden_layers=LAYERS[mesh].get(schedule, 7))


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _value_and_grad(model, loss):
    batch = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (ROWS, 17)),
                        jnp.int32)

    def f(m, batch):
        def total(m):
            t, (parts, out) = loss(m, batch)
            return t, (parts, out.expert_counts, out.mtp_expert_counts)
        return nnx.value_and_grad(total, has_aux=True)(m)
    return nnx.jit(f)(model, batch)


_REFERENCES = {}


def _reference(cfg, mtp_lambda):
    key = cfg.num_hidden_layers, mtp_lambda
    if key not in _REFERENCES:
        _REFERENCES[key] = _value_and_grad(init_model(cfg, seed=0), lambda m, b: lm_loss(
            m, b, mtp_lambda=mtp_lambda, balance_alpha=1e-2))
    return _REFERENCES[key]


@pytest.mark.parametrize("schedule,mesh_spec", CASES)
def test_schedule_loss_gradients_and_counts_match_single_device(schedule, mesh_spec):
    """The non-slow case runs without MTP (a smaller compile; the 10-step run below has it)."""
    cfg = _cfg(schedule, mesh_spec)
    mtp_lambda = 0.0 if (schedule, mesh_spec) in FAST else 0.3
    (r_total, (r_parts, r_counts, r_mtp)), r_grads = _reference(cfg, mtp_lambda)
    mesh = make_mesh(mesh_spec)
    model = init_model(cfg, seed=0, mesh=mesh)
    with jax.set_mesh(mesh):
        (total, (parts, counts, mtp)), grads = _value_and_grad(model, lambda m, b: pipeline_lm_loss(
            m, b, schedule=schedule, microbatches=MICRO[mesh_spec], mtp_lambda=mtp_lambda,
            balance_alpha=1e-2))
    assert _rel(total, r_total) <= 1e-5
    for k in ("ce", "mtp", "balance", "loss"):
        assert _rel(parts[k], r_parts[k]) <= 1e-5, k
    np.testing.assert_array_equal(counts, r_counts)       # per MoE layer, in layer order
    np.testing.assert_array_equal(mtp, r_mtp)
    g = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(grads)}
    rg = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(r_grads)}
    assert g.keys() == rg.keys()
    worst = max((_rel(g[k], rg[k]), k) for k in rg)
    assert worst[0] <= 1e-5, worst


# --- train.py's loop: 10 steps equal the single-device run --------------------------------

@pytest.fixture(scope="module")
def corpus():
    return str(Path(json.__file__).parent)   # fixed text: the trajectories do not drift


def _train(corpus, cfg, out, **kw):
    path = Path(out) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict()))
    base = dict(config=str(path), corpus=corpus, steps=10, batch_size=16, seq_len=32,
                warmup_steps=10, checkpoint_every=10, out=str(Path(out) / "run"),
                balance_alpha=1e-2)
    base.update(kw)
    lines = []
    return train(RunConfig(**base), log=lines.append), lines


_SINGLE = {}


@pytest.mark.slow
@pytest.mark.parametrize("schedule,mesh_spec", CASES)
def test_schedule_training_matches_single_device(schedule, mesh_spec, corpus, tmp_path_factory):
    """Trajectories equal to rel. 1e-5 as long as no routing decision sits within rounding of a
    tie: the micro-batched loss head sums in another order than the single-device run (as
    `--accumulate 2` does, whose parameters differ from the unaccumulated run's by 4e-6 after
    4 steps, 1F1B's by 2e-6), and a top-k flip then changes the gradients at once (with
    batch 8 and the default balance weight, 1F1B's grad norm departs by 4e-4 at step 5)."""
    cfg = _cfg(schedule, mesh_spec)
    if cfg.num_hidden_layers not in _SINGLE:
        _SINGLE[cfg.num_hidden_layers] = _train(corpus, cfg, tmp_path_factory.mktemp("single"))[0]
    hist, lines = _train(corpus, cfg, tmp_path_factory.mktemp(schedule), mesh=mesh_spec,
                         microbatches=MICRO[mesh_spec], pipeline_schedule=schedule)
    assert any("bubble" in line and "micro-batches" in line for line in lines), lines
    single = _SINGLE[cfg.num_hidden_layers]
    for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in hist], [h[key] for h in single], rtol=1e-5,
                                   err_msg=key)
    np.testing.assert_allclose([h["imbalance"] for h in hist], [h["imbalance"] for h in single],
                               rtol=1e-5)


def test_schedule_errors(corpus, tmp_path):
    cfg = BASE.replace(num_hidden_layers=7)
    with pytest.raises(TrainingError, match="--pipeline-schedule 'pipedream': use one of"):
        _train(corpus, cfg, tmp_path / "a", mesh="pipeline=2,expert=4", pipeline_schedule="pipedream")
    with pytest.raises(TrainingError, match="--pipeline-schedule 1f1b applies to pipeline meshes"):
        _train(corpus, cfg, tmp_path / "b", mesh="data=8", pipeline_schedule="1f1b")
    with pytest.raises(TrainingError, match="dualpipev needs at least 2 x 2 stages = 4 micro"):
        _train(corpus, cfg, tmp_path / "c", mesh="pipeline=2,expert=4", microbatches=2,
               pipeline_schedule="dualpipev")
    with pytest.raises(TrainingError, match="4 stages x 2 chunks but the model has only 6 MoE"):
        _train(corpus, cfg, tmp_path / "d", mesh="pipeline=4,data=2", microbatches=8,
               pipeline_schedule="dualpipev")
    lines = []
    assert train(RunConfig(mesh="pipeline=4,data=2", microbatches=8, pipeline_schedule="zb",
                           print_schedule=True), log=lines.append) == []
    assert lines[0].startswith("zb: 4 stages x 1 chunk(s), 8 micro-batches")
    with pytest.raises(PipelineError, match="needs a mesh with pipeline > 1"):
        pipeline_lm_loss(init_model(cfg), jnp.zeros((2, 9), jnp.int32), schedule="1f1b",
                         microbatches=2)


@pytest.mark.slow  # four schedules compiled at tiny sizes: minutes on 2 cores
def test_benchmark_smoke(tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / "B.md"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "benchmarks/pipeline_schedules.py", "--smoke", "--out",
                           str(out)], cwd=Path(__file__).parent.parent, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Pipeline schedules on CPU: step time vs micro-batches" in text
    for s in ("gpipe", "1f1b", "zb", "dualpipev"):
        assert f"| {s} |" in text.replace("  ", " ") or f" {s} |" in text, s
