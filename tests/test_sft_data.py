"""Chat data for fine-tuning: rendering, the assistant-only loss mask, bad lines, packing."""

import json

import numpy as np
import pytest

from dsv3_jax import data
from dsv3_jax.conversations import ConversationPacker, load_conversations
from dsv3_jax.serve.chat import ChatTemplate

EOS = 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text("the quick brown fox jumps over the lazy dog. hello there, how are you? "
                             "<|user|> <|assistant|> <|system|> " * 20)
    return data.load_or_train_tokenizer(data.corpus_files(d), 300, cache_dir=d / "cache")


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


CONV = {"messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello there"},
                     {"role": "assistant", "content": "the fox"},
                     {"role": "user", "content": "how are you?"},
                     {"role": "assistant", "content": "lazy dog"}]}


def test_only_assistant_tokens_are_trained_on(tokenizer, tmp_path):
    conv, = load_conversations(_write(tmp_path / "c.jsonl", [CONV]), tokenizer, EOS)
    ids, mask = conv.ids.tolist(), conv.mask.astype(bool)
    assert ids[-1] == EOS and mask[-1]  # the conversation ends with a trained EOS
    # serving's fallback template: "<|assistant|>\n" prompts, the reply and its newline follow
    assert tokenizer.decode([i for i, m in zip(ids[:-1], mask[:-1]) if m]) == "the fox\nlazy dog\n"
    assert tokenizer.decode(ids[:-1]) == ("<|system|>\nbe brief\n<|user|>\nhello there\n<|assistant|>\n"
                                          "the fox\n<|user|>\nhow are you?\n<|assistant|>\nlazy dog\n")
    assert conv.where == f"{tmp_path / 'c.jsonl'}:1"


def test_a_jinja_template_with_end_of_turn_markup(tokenizer, tmp_path):
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                            "U: {{ m['content'] }} {% else %}A: {{ m['content'] }}{{ eos_token }}"
                            "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}",
                            bos_token="<|bos|>", eos_token="<|eos|>")
    conv, = load_conversations(_write(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fox"}]}]),
        tokenizer, EOS, template)
    ids = conv.ids.tolist()
    assert ids[0] == 0 and ids[-1] == EOS and ids.count(EOS) == 1  # the template's EOS, not a second
    # the token " fox" straddles the prompt's trailing space (BPE): it belongs to the reply
    assert tokenizer.decode([i for i, m in zip(ids, conv.mask) if m]).strip() == "fox"
    assert conv.mask[-1] == 1


@pytest.mark.parametrize("line, error", [
    ("{not json", r"c.jsonl:2: line is not valid JSON"),
    ({"text": "hi"}, r"c.jsonl:2: line has no \"messages\" list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"c.jsonl:2: .*no assistant message"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"c.jsonl:2: .*wizard"),
])
def test_bad_lines_name_file_and_line(tokenizer, tmp_path, line, error):
    with pytest.raises(data.DataError, match=error):
        load_conversations(_write(tmp_path / "c.jsonl", [CONV, line]), tokenizer, EOS)


def test_packing_keeps_conversations_whole_and_truncates_long_ones(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    words = ["fox", "dog", "hello", "there", "the", "lazy"]
    lines = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 12)))},
                           {"role": "assistant", "content": "the fox"}]} for _ in range(40)]
    lines.append({"messages": [{"role": "user", "content": "hello " * 200},
                               {"role": "assistant", "content": "dog"}]})
    convs = load_conversations(_write(tmp_path / "c.jsonl", lines), tokenizer, EOS)
    packer = ConversationPacker(convs, 4, 95, seed=1, pad_id=2)
    assert packer.truncated == 1
    whole = {tuple(c.ids.tolist()) for c in convs}
    seen = 0
    for _ in range(packer.batches_per_epoch):
        tokens, segs, mask = packer.next()
        for t, s, m in zip(tokens, segs, mask):
            assert (m[s == 0] == 0).all() and (t[s == 0] == 2).all()
            for seg in set(s.tolist()) - {0}:
                piece = tuple(t[s == seg].tolist())
                assert piece in whole or len(piece) == 96, piece  # whole, or a cut long one
                seen += 1
    assert seen >= len(convs) - 8  # the last partial batch of the epoch is dropped
    state = packer.state()
    again = ConversationPacker(convs, 4, 95, seed=1, pad_id=2)
    again.restore(state)
    for a, b in zip(packer.next(), again.next()):
        np.testing.assert_array_equal(a, b)


def test_resuming_with_the_other_data_mode_is_an_error(tokenizer, tmp_path):
    convs = load_conversations(_write(tmp_path / "c.jsonl", [CONV] * 8), tokenizer, EOS)
    sft_state = ConversationPacker(convs, 2, 63).state()
    tokens = np.arange(3, 400, dtype=np.uint16)
    with pytest.raises(data.DataError, match="fine-tuned on chat data; resume it with --sft"):
        data.TokenBatcher(tokens, 2, 16).restore(sft_state)
    with pytest.raises(data.DataError, match="not chat data; resume it without --sft"):
        ConversationPacker(convs, 2, 63).restore(data.TokenBatcher(tokens, 2, 16).state())
