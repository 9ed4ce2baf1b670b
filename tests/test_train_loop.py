"""The training loop end to end on a small corpus: falling loss, exact resume, clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dsv3_jax.train.loop import RunConfig, TrainingError, train
from tests.conftest import FIXTURES, ROOT

@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The v3_mtp fixture architecture (every feature, small) with a 512-token vocabulary."""
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d["vocab_size"] = 512
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for f in sorted((ROOT / "dsv3_jax").rglob("*.py")):
        shutil.copy(f, d / f"{f.parent.name}_{f.name}")
    return str(d)


def _run(corpus, out, config, **kw):
    base = dict(config=config, corpus=corpus, steps=8, batch_size=4, seq_len=32, warmup_steps=2,
                checkpoint_every=4, out=str(out), lr=1e-2)
    base.update(kw)
    return train(RunConfig(**base), log=lambda *a: None)


def test_loss_falls_and_metrics_are_written(corpus, config, tmp_path):
    hist = _run(corpus, tmp_path, config, steps=20, checkpoint_every=10)
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21)) and all("loss" in x for x in lines)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "config.json").exists()
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


def test_sigkill_then_resume_continues_exactly(corpus, config, tmp_path):
    """A run SIGKILLed after a checkpoint, then resumed, gives the uninterrupted run's losses."""
    full = _run(corpus, tmp_path / "a", config, steps=12, checkpoint_every=2)
    out = tmp_path / "b"
    args = [sys.executable, str(ROOT / "train.py"), "--config", config, "--corpus", corpus,
            "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2",
            "--checkpoint-every", "2", "--out", str(out), "--lr", "0.01"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "2").is_dir():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _run(corpus, out, config, steps=12, checkpoint_every=2, resume=True)
    start = resumed[0]["step"]
    assert 3 <= start <= 11 and [h["step"] for h in resumed] == list(range(start, 13))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[start - 1:]]


def test_bad_inputs(corpus, config, tmp_path):
    with pytest.raises(ValueError, match="missing"):
        _run(str(tmp_path / "missing"), tmp_path / "x", config)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="not writable"):
        _run(corpus, blocker / "out", config)


def test_mesh_run_matches_single_device(corpus, config, tmp_path):
    """--mesh data=2,expert=4 (expert-parallel all-to-all, FSDP) gives the single-device losses."""
    single = _run(corpus, tmp_path / "single", config, steps=6, batch_size=8)
    sharded = _run(corpus, tmp_path / "mesh", config, steps=6, batch_size=8, mesh="data=2,expert=4")
    a = np.array([h["loss"] for h in single])
    b = np.array([h["loss"] for h in sharded])
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_mesh_that_does_not_divide_the_batch(corpus, config, tmp_path):
    with pytest.raises(ValueError, match="batch dimension of size 6 is not divisible by 8"):
        _run(corpus, tmp_path / "m", config, steps=1, batch_size=6, mesh="expert=8")


def test_init_from_hf_starts_from_the_checkpoint(corpus, config, tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax import ModelConfig, data, init_model, save_hf
    from dsv3_jax.train.losses import lm_loss
    cfg = ModelConfig.from_json(config)
    start = init_model(cfg, seed=7)
    save_hf(start, tmp_path / "hf")
    hist = _run(corpus, tmp_path / "run", config, steps=1, init_from_hf=str(tmp_path / "hf"))
    files = data.corpus_files(corpus)
    tokens = data.encode_corpus(files, data.load_or_train_tokenizer(files, cfg.vocab_size))
    batch = jnp.asarray(data.TokenBatcher(tokens, 4, 32, seed=0).next())
    loss, _ = nnx.jit(lambda m, b: lm_loss(m, b))(start, batch)
    assert abs(hist[0]["loss"] - float(loss)) < 1e-5 * abs(float(loss))
    assert "mfu" in hist[0]  # None on CPU: no known peak
