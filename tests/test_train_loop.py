"""The training loop end to end on a small corpus: falling loss, exact resume, clear errors."""

import email
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
def corpus():
    """The standard library's `email` package: fixed text, so edits to this repository do not
    change the data or the 20-step trajectories compared below."""
    return str(Path(email.__file__).parent)


def _run(corpus, out, config, **kw):
    base = dict(config=config, corpus=corpus, steps=8, batch_size=4, seq_len=32, warmup_steps=2,
                checkpoint_every=4, out=str(out), lr=1e-2)
    base.update(kw)
    return train(RunConfig(**base), log=lambda *a: None)


def test_loss_falls_and_metrics_are_written(corpus, config, tmp_path):
    """20 steps with a held-out evaluation every 5 (on the `json` package's sources): the
    training and held-out losses fall; metrics.jsonl, TensorBoard events, plot, checkpoints."""
    held_out = str(Path(json.__file__).parent)
    hist = _run(corpus, tmp_path, config, steps=20, checkpoint_every=10, eval_corpus=held_out,
                eval_every=5)
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21)) and all("loss" in x for x in lines)
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in evals] == [5, 10, 15, 20]
    assert all(abs(x["eval_ppl"] - np.exp(x["eval_loss"])) < 1e-6 * x["eval_ppl"] for x in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    assert not any(x["skipped"] for x in lines)
    # pretraining windows: every one of the 4 x 32 predictions is trained on
    assert [(x["trained_tokens"], x["trained_tokens_total"]) for x in lines] == \
        [(128, 128 * s) for s in range(1, 21)]
    assert all(x["trained_tokens_per_s"] == x["tokens_per_s"] for x in lines)
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard, next to metrics.jsonl
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "config.json").exists()
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


@pytest.mark.slow  # CI time: tests/test_train_sft.py SIGKILLs a run and resumes it exactly by default
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
    # metrics.jsonl was cut back to the restored step: each step once, the resumed losses
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert [x["loss"] for x in lines[start - 1:]] == [h["loss"] for h in resumed]

    # a finished run's folder: a fresh run refuses it, a corrupt checkpoint is a clear error
    ckpts = tmp_path / "a" / "checkpoints"
    kept = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(TrainingError, match="already holds checkpoints .* pass --resume"):
        _run(corpus, tmp_path / "a", config, steps=12, checkpoint_every=2)
    for f in (ckpts / "12" / "model").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="step 12 .* cannot be restored.*steps \\[8, 10, 12\\]"):
        _run(corpus, tmp_path / "a", config, steps=14, checkpoint_every=2, resume=True)
    assert sorted(p.name for p in ckpts.iterdir()) == kept


def test_bad_inputs(corpus, config, tmp_path):
    with pytest.raises(ValueError, match="missing"):
        _run(str(tmp_path / "missing"), tmp_path / "x", config)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="not writable"):
        _run(corpus, blocker / "out", config)
    with pytest.raises(TrainingError, match="--moments-dtype 'fp16': use one of fp32, bf16"):
        _run(corpus, tmp_path / "m", config, moments_dtype="fp16")
    with pytest.raises(TrainingError, match="--capacity-factor 1.25: .* expert-parallel dispatch"):
        _run(corpus, tmp_path / "c", config, capacity_factor=1.25)
    with pytest.raises(TrainingError, match="--eval-every 5 needs a held-out set: --eval-corpus"):
        _run(corpus, tmp_path / "e", config, eval_every=5)
    with pytest.raises(TrainingError, match="--eval-corpus .*missing.* does not exist"):
        _run(corpus, tmp_path / "e", config, eval_corpus=str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def single_device_losses(corpus, config, tmp_path_factory):
    """20 steps on one device: the reference for the mesh and multi-process runs."""
    hist = _run(corpus, tmp_path_factory.mktemp("single"), config, steps=20, batch_size=8,
                checkpoint_every=20)
    return np.array([h["loss"] for h in hist])


@pytest.mark.slow  # CI time: the two-process run below is a mesh run too
def test_mesh_run_matches_single_device(corpus, config, tmp_path, single_device_losses):
    """--mesh data=2,expert=4 (expert-parallel all-to-all, FSDP) gives the single-device losses."""
    sharded = _run(corpus, tmp_path / "mesh", config, steps=20, batch_size=8, checkpoint_every=20,
                   mesh="data=2,expert=4")
    np.testing.assert_allclose([h["loss"] for h in sharded], single_device_losses, rtol=1e-5)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_device(corpus, config, tmp_path, single_device_losses):
    """2 processes x 4 CPU devices (jax.distributed from the environment, gloo collectives):
    each reads its half of every batch; losses equal the single-device run's, checkpoints save."""
    out = tmp_path / "mp"
    port = _free_port()
    args = [sys.executable, str(ROOT / "train.py"), "--config", config, "--corpus", corpus,
            "--steps", "20", "--batch-size", "8", "--seq-len", "32", "--warmup-steps", "2",
            "--checkpoint-every", "10", "--out", str(out), "--lr", "0.01", "--mesh", "data=2,expert=4"]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)[-4000:]
    assert "process 1 of 2" in logs[1]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))  # written by process 0 only
    losses = [x["loss"] for x in lines]
    np.testing.assert_allclose(losses[:10], single_device_losses[:10], rtol=1e-5)
    # gloo's cross-process sums add in another order; by step 15 that is ~5e-5 relative
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


def test_mesh_that_does_not_divide_the_batch_or_the_experts(corpus, config, tmp_path):
    with pytest.raises(TrainingError, match="batch dimension of size 6 .* is not divisible by 8"):
        _run(corpus, tmp_path / "m", config, steps=1, batch_size=6, mesh="expert=8")
    d = json.loads(open(config).read())
    d.update(n_routed_experts=12, n_group=4)
    (tmp_path / "c12.json").write_text(json.dumps(d))
    with pytest.raises(TrainingError, match="n_routed_experts 12 is not divisible by the expert axis size 8"):
        _run(corpus, tmp_path / "m", str(tmp_path / "c12.json"), steps=1, mesh="expert=8")


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
    tokens = data.encode_corpus(files, data.load_or_train_tokenizer(files, cfg.vocab_size),
                                bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)  # BOS text EOS
    batch = jnp.asarray(data.TokenBatcher(tokens, 4, 32, seed=0).next())
    loss, _ = nnx.jit(lambda m, b: lm_loss(m, b))(start, batch)
    assert abs(hist[0]["loss"] - float(loss)) < 1e-5 * abs(float(loss))
    assert "mfu" in hist[0]  # None on CPU: no known peak
