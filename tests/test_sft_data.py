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


def _convs(tokenizer, tmp_path, n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["fox", "dog", "hello", "there", "the", "lazy", "quick", "brown"]
    lines = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, rng.integers(2, 9)))},
                           {"role": "assistant", "content": "the fox"}]} for _ in range(n)]
    return load_conversations(_write(tmp_path / f"c{n}.jsonl", lines), tokenizer, EOS)


def test_held_out_split_is_whole_conversations_by_content(tokenizer, tmp_path):
    from dsv3_jax.conversations import MIN_SPLIT, held_out_split
    convs = _convs(tokenizer, tmp_path, 60)
    convs += [convs[7], convs[7], convs[30]]  # copies: a held-out one is held out every time
    trained, held = held_out_split(convs, 0.05)
    assert len(held) >= 3 and len(trained) + len(held) == len(convs)
    key = lambda c: tuple(c.ids.tolist())  # noqa: E731
    assert not {key(c) for c in trained} & {key(c) for c in held}  # never also trained on
    # the same split whatever the order of the lines
    again = held_out_split(convs[::-1], 0.05)[1]
    assert sorted(map(key, again)) == sorted(map(key, held))
    assert held_out_split(convs, 0.0) == (convs, [])
    small = convs[:MIN_SPLIT - 1]
    assert held_out_split(small, 0.02) == (small, [])  # too few to hold any out
    assert len(held_out_split(convs[:MIN_SPLIT], 0.02)[1]) == 1  # at least one
    with pytest.raises(data.DataError, match="fraction 1.5 must be in"):
        held_out_split(convs, 1.5)


def test_held_out_conversation_batches(tokenizer, tmp_path):
    """Whole conversations in order, the last batch filled with empty rows; two processes'
    slices make one process's batches."""
    from dsv3_jax.conversations import next_fit
    from dsv3_jax.train.evaluate import held_out_conversations
    convs = _convs(tokenizer, tmp_path, 9)
    batches = held_out_conversations(convs, 4, 47, pad_id=2)
    rows = next_fit([len(c.ids) for c in convs], 48)
    assert len(batches) == -(-len(rows) // 4) and all(b[0].shape == (4, 48) for b in batches)
    pieces = [tuple(t[s == k].tolist()) for tokens, segs, _ in batches for t, s in zip(tokens, segs)
              for k in sorted(set(s.tolist()) - {0})]
    assert pieces == [tuple(c.ids.tolist()) for c in convs]
    assert not batches[-1][2][len(rows) % 4 or 4:].any()  # empty rows weigh nothing
    halves = [held_out_conversations(convs, 4, 47, pad_id=2, process_index=i, process_count=2)
              for i in (0, 1)]
    for whole, a, b in zip(batches, *halves):
        for x, y, z in zip(whole, a, b):
            np.testing.assert_array_equal(x, np.concatenate([y, z]))


def test_nothing_to_train_on_is_an_error(tokenizer, tmp_path):
    # a template that renders no assistant text, conversations that end with a user turn (so
    # their EOS is no reply's end): not one trainable token
    mute = ChatTemplate("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                        "{% endif %}{% endfor %}")
    ends_with_user = {"messages": CONV["messages"][:4]}
    with pytest.raises(data.DataError, match="no assistant token survives the rendering"):
        load_conversations(_write(tmp_path / "u.jsonl", [ends_with_user] * 2), tokenizer, EOS, mute)
    path = _write(tmp_path / "c.jsonl", [CONV])
    # every reply lies past --seq-len: the rows would train on nothing
    long = {"messages": [{"role": "user", "content": "hello there " * 40},
                         {"role": "assistant", "content": "the fox"}]}
    convs = load_conversations(_write(tmp_path / "l.jsonl", [long] * 4), tokenizer, EOS)
    with pytest.raises(data.DataError, match="no conversation has an assistant token within its "
                                             "first --seq-len 31"):
        ConversationPacker(convs, 2, 31)
    packer = ConversationPacker(convs + load_conversations(path, tokenizer, EOS), 2, 31)
    assert packer.truncated == 5 and packer.untrainable == 4


def test_run_data_holds_out_conversations_from_training(tokenizer, tmp_path):
    """--sft without --eval-corpus: the held-out conversations are evaluated and never in a
    training row; --eval-corpus takes chat data (conversation batches) or text (windows)."""
    import dataclasses

    from dsv3_jax.train.loop import RunConfig
    from dsv3_jax.train.run_data import load_run_data
    convs = _convs(tokenizer, tmp_path, 60)
    run = RunConfig(sft=str(tmp_path / "c60.jsonl"), batch_size=4, seq_len=47, eval_fraction=0.05)
    layout = dict(seed=0, process_index=0, process_count=1)
    logs = []
    got = load_run_data(run, [], tokenizer, None, EOS, layout, logs.append)
    assert "57 conversations" in logs[0] and "3 held out for evaluation" in logs[0], logs
    key = lambda ids: tuple(ids.tolist())  # noqa: E731
    held = {key(c.ids) for c in convs} - {key(c.ids) for c in got.batcher.convs}
    assert len(held) == 3
    in_eval = {key(t[s == k]) for tokens, segs, _ in got.held_out for t, s in zip(tokens, segs)
               for k in set(s.tolist()) - {0}}
    assert in_eval == held
    for _ in range(3 * got.batcher.batches_per_epoch):
        tokens, segs, _ = got.batcher.next()
        assert not {key(t[s == k]) for t, s in zip(tokens, segs) for k in set(s.tolist()) - {0}} & held
    chat_eval = load_run_data(dataclasses.replace(run, eval_corpus=str(tmp_path / "c60.jsonl")),
                              [], tokenizer, None, EOS, layout, logs.append)
    assert len(chat_eval.batcher.convs) == 60 and len(chat_eval.held_out[0]) == 3
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    text_eval = load_run_data(dataclasses.replace(run, eval_corpus=str(text)), [], tokenizer, None,
                              EOS, layout, logs.append)
    assert len(text_eval.held_out[0]) == 1 and text_eval.held_out[0][0].shape == (4, 48)
    with pytest.raises(data.DataError, match="--eval-every 5 needs a held-out set"):
        load_run_data(dataclasses.replace(run, eval_fraction=0.0, eval_every=5), [], tokenizer,
                      None, EOS, layout, logs.append)
