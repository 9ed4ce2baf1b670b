"""Supervised fine-tuning end to end: `--sft` chat data, loss on the assistant tokens only."""

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


def _sft_run(config, tmp_path, steps=40):
    import email
    from pathlib import Path
    chat = _chat_file(tmp_path / "chat.jsonl")
    hist = train(RunConfig(config=config, corpus=str(Path(email.__file__).parent),
                           sft=str(chat), steps=steps, batch_size=4, seq_len=64, warmup_steps=4,
                           checkpoint_every=steps, lr=1e-2, out=str(tmp_path / "run")),
                 log=lambda *a: None)
    return [h["ce"] for h in hist]


def test_sft_learns_the_fixed_reply(config, tmp_path):
    """Masked to the assistant turns, the loss is the fixed reply's: it falls towards 0 while
    the random user turns (which would dominate an unmasked loss) cost nothing."""
    ce = _sft_run(config, tmp_path)
    print(f"masked SFT: CE {ce[0]:.3f} -> {np.mean(ce[-5:]):.3f} (mean of the last 5 steps)")
    assert ce[0] > 3.0 and np.mean(ce[-5:]) < 0.5, ce


@pytest.mark.slow
def test_without_the_mask_the_loss_stays_high(config, tmp_path, monkeypatch):
    """The same run scoring every token: the random user turns keep the loss far from 0 (the
    masked run's low loss is the mask's doing)."""
    from dsv3_jax.conversations import ConversationPacker
    masked_next = ConversationPacker.next

    def unmasked(self):
        tokens, segments, _ = masked_next(self)
        return tokens, segments, (segments > 0).astype(np.int32)

    monkeypatch.setattr(ConversationPacker, "next", unmasked)
    ce = _sft_run(config, tmp_path)
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
