"""Supervised fine-tuning end to end: `--sft` chat data, loss on the assistant tokens only."""

import dataclasses
import json

import numpy as np
import pytest

from dsv3_jax.train.loop import RunConfig, TrainingError, train
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d.update(vocab_size=512, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


def _chat_file(path, n=64, seed=0):
    """User turns of random letters (unlearnable), always the same short assistant reply."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    with path.open("w") as f:
        for _ in range(n):
            user = " ".join("".join(rng.choice(letters, 5)) for _ in range(rng.integers(3, 8)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": "OK, done."}]}) + "\n")
    return path


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>"
            "{{ m['content'] }}{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_checkpoint(config, tmp_path_factory):
    """A Hugging Face folder to fine-tune: random weights of the test architecture
    (config.json, safetensors), a byte-level BPE tokenizer.json (trained on the `email`
    package's fixed sources) and a tokenizer_config.json with a jinja chat template."""
    import email
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv3_jax import ModelConfig, init_model, save_hf
    root = tmp_path_factory.mktemp("hf") / "ckpt"
    save_hf(init_model(ModelConfig.from_json(config), seed=5), root)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [p.read_text() for p in sorted(Path(email.__file__).parent.rglob("*.py"))],
        trainers.BpeTrainer(vocab_size=512, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}))
    return root


def test_sft_from_hf_learns_resumes_exactly_after_sigkill_and_serves(hf_checkpoint, tmp_path):
    """The issue's acceptance run: `train.py --init-from-hf DIR --sft chat.jsonl` (random user
    turns, one fixed reply; 2% of the conversations held out for evaluation) is SIGKILLed after
    its first checkpoint; `--resume` recomputes the steps the killed run had logged after that
    checkpoint bit for bit and finishes; the loss on the assistant tokens (training and
    held-out) falls towards 0, which only a correct mask allows; the metrics count the trained
    tokens; and serving's chat path renders a conversation's prompt to exactly the tokens SFT
    trained on before the reply, then greedily generates the reply SFT taught. Both runs are
    train.py processes sharing a persistent compilation cache (the resumed one compiles
    nothing)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from tokenizers import Tokenizer

    from dsv3_jax.conversations import encode_conversation, load_conversations
    from dsv3_jax.serve.api_params import RequestParser
    from dsv3_jax.serve.engine import Engine
    from dsv3_jax.serve.loading import load_for_serving
    from tests.conftest import ROOT

    chat, out = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(hf_checkpoint / "config.json"),
            "--init-from-hf", str(hf_checkpoint), "--sft", str(chat), "--steps", "40",
            "--batch-size", "4", "--seq-len", "64", "--warmup-steps", "4", "--checkpoint-every",
            "10", "--lr", "0.01", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        # killed after the checkpoint at step 10, once it has logged steps past it
        if (out / "checkpoints" / "10").is_dir() and metrics.is_file() and \
                len(metrics.read_text().splitlines()) >= 13:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed = {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines()[:-1])}
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    restored = int(re.search(r"resumed from step (\d+)", resumed.stdout).group(1))
    assert restored in (10, 20, 30), resumed.stdout  # 10 unless this process was starved
    assert "1 held out for evaluation (--eval-fraction 0.02" in resumed.stdout, resumed.stdout

    # metrics.jsonl: each step once; the resumed steps are the killed run's, bit for bit
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    overlap = [s for s in killed if s > restored]
    assert len(overlap) >= 2, sorted(killed)
    for s in overlap:
        assert {k: records[s - 1][k] for k in ("loss", "ce", "grad_norm", "trained_tokens")} == \
            {k: killed[s][k] for k in ("loss", "ce", "grad_norm", "trained_tokens")}, s
    # the loss on the fixed reply falls towards 0, on the held-out conversation too
    ce = [r["ce"] for r in records]
    print(f"masked SFT: CE {ce[0]:.3f} -> {np.mean(ce[-5:]):.3f} (mean of the last 5 steps)")
    assert ce[0] > 3.0 and np.mean(ce[-5:]) < 0.5, ce
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == [10, 20, 30, 40] and evals[-1][1] < 0.5 < evals[0][1], evals

    # trained tokens: every conversation trains the same reply (R tokens); the totals add up
    # over the resume
    model, served_tok, template, _ = load_for_serving(out, dtype="fp32")
    assert template is not None and template.source == TEMPLATE  # the run kept the HF template
    tok = Tokenizer.from_file(str(hf_checkpoint / "tokenizer.json"))
    convs = load_conversations(chat, tok, 1, template)
    reply = int(convs[0].mask[1:].sum())
    assert all(int(c.mask[1:].sum()) == reply for c in convs)
    assert all(r["trained_tokens"] > 0 and r["trained_tokens"] % reply == 0 for r in records)
    assert [r["trained_tokens_total"] for r in records] == \
        np.cumsum([r["trained_tokens"] for r in records]).tolist()
    for r in records:
        assert abs(r["trained_tokens_per_s"] / r["tokens_per_s"] - r["trained_tokens"] / 256) < 1e-9

    # serving: a chat request's prompt is SFT's rendering up to the reply, and it generates it
    user = {"role": "user", "content": "qwert yuiop asdfg"}
    parser = RequestParser(max_seq_len=64, eos_ids=(1,), tokenizer=served_tok, chat_template=template)
    job = parser.parse({"messages": [user], "max_tokens": 16}, chat=True)
    prompt, = job.prompts
    conv = encode_conversation(template, tok, [user, {"role": "assistant", "content": "OK, done."}], 1)
    assert prompt == conv.ids[:len(prompt)].tolist()
    assert not conv.mask[:len(prompt)].any() and conv.mask[len(prompt):].all()
    engine = Engine(model, max_seq_len=64, max_batch=1, speculative=False)
    assert engine.submit(prompt, job.params).result() == conv.ids[len(prompt):].tolist()


@pytest.mark.slow
def test_without_the_mask_the_loss_stays_high(hf_checkpoint, tmp_path, monkeypatch):
    """The acceptance run's training (same checkpoint, data and flags, in this process) scoring
    every token: the random user turns keep the loss far from 0, so the masked run's loss near
    0 is the mask's doing."""
    from dsv3_jax.conversations import ConversationPacker
    masked_next = ConversationPacker.next

    def unmasked(self):
        tokens, segments, _ = masked_next(self)
        return tokens, segments, (segments > 0).astype(np.int32)

    monkeypatch.setattr(ConversationPacker, "next", unmasked)
    hist = train(RunConfig(config=str(hf_checkpoint / "config.json"), init_from_hf=str(hf_checkpoint),
                           sft=str(_chat_file(tmp_path / "chat.jsonl")), steps=40, batch_size=4,
                           seq_len=64, warmup_steps=4, checkpoint_every=10, lr=1e-2,
                           out=str(tmp_path / "run")), log=lambda *a: None)
    ce = [h["ce"] for h in hist]
    print(f"unmasked: CE {ce[0]:.3f} -> {np.mean(ce[-5:]):.3f} (mean of the last 5 steps)")
    assert np.mean(ce[-5:]) > 1.0, ce


def test_sft_errors_name_the_flag_and_line(config, tmp_path):
    import email
    from pathlib import Path
    chat = tmp_path / "bad.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "yo"}]}\n{"messages": 3}\n')
    run = RunConfig(config=config, corpus=str(Path(email.__file__).parent), sft=str(chat),
                    steps=1, batch_size=4, seq_len=64, out=str(tmp_path / "run"))
    with pytest.raises(TrainingError, match=r"--sft .*bad.jsonl: .*bad.jsonl:2: "):
        train(run, log=lambda *a: None)
    good = _chat_file(tmp_path / "good.jsonl", n=12)
    with pytest.raises(TrainingError, match=r"--sft .*good.jsonl: held-out fraction 1.5 must be in "
                                            r"\[0, 1\)"):
        train(dataclasses.replace(run, sft=str(good), eval_fraction=1.5), log=lambda *a: None)
    with pytest.raises(TrainingError, match=r"--eval-every 5 needs a held-out set"):
        train(dataclasses.replace(run, sft=str(good), eval_fraction=0.0, eval_every=5),
              log=lambda *a: None)
