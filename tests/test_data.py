"""Data pipeline: corpus loading and its errors, BPE round trip and caching, batching."""

import json

import numpy as np
import pytest

from dsv3_jax import data
from dsv3_jax.data import DataError, TokenBatcher

PY_SOURCE = '''def f(x: int) -> str:
    """Docstring with unicode: \u00e9\u4e2d \U0001f600 and\ttabs."""
    return  f"{x!r:>10}"   # trailing spaces   \n\n\r\n
class  A: pass
'''


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second document " * 50)
    (root / "a.py").write_text(PY_SOURCE * 20)
    (root / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "from jsonl one " * 30}) + "\n\n" +
        json.dumps({"text": "from jsonl two", "id": 7}) + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    return root


def test_folder_is_recursive_sorted_and_filtered(corpus):
    files = data.corpus_files(corpus)
    assert [p.relative_to(corpus).as_posix() for p in files] == ["a.py", "b.txt", "sub/c.jsonl"]
    docs = list(data.read_documents(files))
    assert docs == [PY_SOURCE * 20, "second document " * 50, "from jsonl one " * 30,
                    "from jsonl two"]
    assert data.corpus_files(corpus / "b.txt") == [corpus / "b.txt"]


@pytest.mark.parametrize("line, msg", [('{"text": "ok"', "not valid JSON"),
                                       ('{"body": "x"}', 'no string "text"'),
                                       ('{"text": 3}', 'no string "text"'),
                                       ('["text"]', 'no string "text"')])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{msg}"):
        list(data.read_documents(data.corpus_files(path)))


def test_missing_and_empty_corpus_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope.* does not exist"):
        data.corpus_files(tmp_path / "nope")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        data.corpus_files(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"123")
    with pytest.raises(DataError, match=r"d has no text or \.jsonl files"):
        data.corpus_files(tmp_path / "d")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    files = data.corpus_files(tmp_path / "blank.jsonl")
    (tmp_path / "t.txt").write_text("abc")
    tok = data.load_or_train_tokenizer([tmp_path / "t.txt"], 300, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"blank\.jsonl has no text"):
        data.encode_corpus(files, tok, cache_dir=tmp_path / "cache")


def test_tokenizer_round_trip_specials_and_cache(corpus, tmp_path, monkeypatch):
    files = data.corpus_files(corpus)
    cache = tmp_path / "cache"
    tok = data.load_or_train_tokenizer(files, 400, cache_dir=cache)
    assert tok.get_vocab_size() <= 400
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2]
    for text in (PY_SOURCE, " leading space", "\n\n  x\u00a0y \u200b", "caf\u00e9 \u65e5\u672c"):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(PY_SOURCE).ids) < len(PY_SOURCE.encode())  # merges learned

    # A second call loads the cached file: the trainer must not run.
    def no_training(*_):
        raise AssertionError("retrained despite a cached tokenizer")
    monkeypatch.setattr(data, "_train_bpe", no_training)
    again = data.load_or_train_tokenizer(files, 400, cache_dir=cache)
    assert again.to_str() == tok.to_str()
    assert len(list(cache.glob("*.json"))) == 1
    with pytest.raises(AssertionError, match="retrained"):  # other vocab size: new cache key
        data.load_or_train_tokenizer(files, 500, cache_dir=cache)

    # Training is deterministic: a fresh cache gives the same tokenizer.
    monkeypatch.undo()
    fresh = data.load_or_train_tokenizer(files, 400, cache_dir=tmp_path / "cache2")
    assert fresh.to_str() == tok.to_str()


def test_tokenizer_from_checkpoint_folder(corpus, tmp_path):
    files = data.corpus_files(corpus)
    tok = data.load_or_train_tokenizer(files, 300, cache_dir=tmp_path / "cache")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok.save(str(ckpt / "tokenizer.json"))
    loaded = data.load_or_train_tokenizer(files, 4096, tokenizer_path=ckpt)
    assert loaded.to_str() == tok.to_str()
    with pytest.raises(DataError, match=r"ckpt.*more than the model's vocab_size 100"):
        data.load_or_train_tokenizer(files, 100, tokenizer_path=ckpt)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"other/tokenizer\.json does not exist"):
        data.load_or_train_tokenizer(files, 300, tokenizer_path=tmp_path / "other")
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"ckpt/tokenizer\.json cannot be read"):
        data.load_or_train_tokenizer(files, 4096, tokenizer_path=ckpt)
    # A corrupt cache entry is retrained, not fatal.
    (cached,) = (tmp_path / "cache").glob("*.json")
    cached.write_text("{torn")
    assert data.load_or_train_tokenizer(files, 300, cache_dir=tmp_path / "cache").to_str() == \
        tok.to_str()
    with pytest.raises(DataError, match=r"vocab_size 100 is too small"):
        data.load_or_train_tokenizer(files, 100, cache_dir=tmp_path / "cache")


def test_encode_corpus_documents_eos_and_cache(corpus, tmp_path):
    files = data.corpus_files(corpus)
    cache = tmp_path / "cache"
    tok = data.load_or_train_tokenizer(files, 400, cache_dir=cache)
    tokens = data.encode_corpus(files, tok, cache_dir=cache)
    assert tokens.dtype == np.uint16 and tokens[-1] == data.EOS_ID
    # Oracle: encode each document on its own and join with eos.
    expected = []
    for doc in data.read_documents(files):
        expected += tok.encode(doc, add_special_tokens=False).ids + [data.EOS_ID]
    np.testing.assert_array_equal(tokens, expected)
    docs = np.split(np.asarray(tokens), np.flatnonzero(tokens == data.EOS_ID)[:-1] + 1)
    assert [tok.decode(d[:-1].tolist()) for d in docs] == list(data.read_documents(files))
    assert len(list(cache.glob("*.tokens.npy"))) == 1
    cached = data.encode_corpus(files, tok, cache_dir=cache)
    assert isinstance(cached, np.memmap)
    np.testing.assert_array_equal(cached, tokens)


def test_documents_framed_by_the_configs_bos_and_eos(corpus, tmp_path):
    """DeepSeek's convention: BOS + text + EOS per document, ids from the model config."""
    files = data.corpus_files(corpus)
    cache = tmp_path / "cache"
    tok = data.load_or_train_tokenizer(files, 400, cache_dir=cache)
    assert data.document_markers(0, 1, tok) == (0, 1)
    assert data.document_markers(None, [1, 2], tok) == (None, 1)
    with pytest.raises(data.DataError, match="bos_token_id 400 is not a token of the tokenizer"):
        data.document_markers(400, 1, tok)
    with pytest.raises(data.DataError, match="no eos_token_id"):
        data.document_markers(0, None, tok)
    tokens = data.encode_corpus(files, tok, bos_id=0, eos_id=1, cache_dir=cache)
    expected = []
    for doc in data.read_documents(files):
        expected += [0] + tok.encode(doc, add_special_tokens=False).ids + [1]
    np.testing.assert_array_equal(tokens, expected)
    plain = data.encode_corpus(files, tok, eos_id=1, cache_dir=cache)  # a cache entry of its own
    assert len(plain) == len(tokens) - len(list(data.read_documents(files)))


def test_stdlib_corpus_subset(tmp_path):
    files = data.corpus_files(None)
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in p.parts for p in files)
    subset = files[:40]
    tok = data.load_or_train_tokenizer(subset, 512, cache_dir=tmp_path)
    tokens = data.encode_corpus(subset, tok, cache_dir=tmp_path)
    text = subset[0].read_bytes().decode("utf-8", errors="replace")
    assert tok.decode(tokens[:np.flatnonzero(tokens == data.EOS_ID)[0]].tolist()) == text


# ---------------------------------------------------------------------------------- batching

TOKENS = np.arange(1000, dtype=np.uint16)  # a window's content tells where it starts


def _take(batcher, n):
    return np.stack([batcher.next() for _ in range(n)])


def test_batcher_windows_are_contiguous_and_cover_epoch():
    b = TokenBatcher(TOKENS, batch_size=4, seq_len=16, seed=3)
    assert b.num_windows == 999 // 16 and b.batches_per_epoch == 62 // 4
    epoch = _take(b, b.batches_per_epoch)
    assert epoch.dtype == np.int32 and epoch.shape == (15, 4, 17)
    windows = epoch.reshape(-1, 17)
    np.testing.assert_array_equal(windows, windows[:, :1] + np.arange(17))  # next-token windows
    starts = windows[:, 0]
    assert len(set(starts)) == 60 and set(starts) <= set(range(0, 62 * 16, 16))
    assert b.state()["epoch"] == 1 and b.state()["position"] == 0
    second = _take(b, b.batches_per_epoch).reshape(-1, 17)[:, 0]
    assert not np.array_equal(second, starts)  # reshuffled each epoch


def test_batcher_is_deterministic_per_seed():
    a = _take(TokenBatcher(TOKENS, 4, 16, seed=1), 40)
    np.testing.assert_array_equal(a, _take(TokenBatcher(TOKENS, 4, 16, seed=1), 40))
    assert not np.array_equal(a, _take(TokenBatcher(TOKENS, 4, 16, seed=2), 40))


@pytest.mark.parametrize("stop", [0, 7, 15, 16, 33])  # includes epoch boundaries
def test_batcher_restore_continues_exactly(stop):
    straight = _take(TokenBatcher(TOKENS, 4, 16, seed=5), 50)
    first = TokenBatcher(TOKENS, 4, 16, seed=5)
    for _ in range(stop):
        first.next()
    state = json.loads(json.dumps(first.state()))
    resumed = TokenBatcher(TOKENS, 4, 16, seed=0)  # seed comes from the state
    resumed.restore(state)
    np.testing.assert_array_equal(_take(resumed, 50 - stop), straight[stop:])


def test_batcher_restore_rejects_other_shapes():
    state = TokenBatcher(TOKENS, 4, 16).state()
    with pytest.raises(DataError, match="batch_size=4 but this run has 8"):
        TokenBatcher(TOKENS, 8, 16).restore(state)
    with pytest.raises(DataError, match="lacks"):
        TokenBatcher(TOKENS, 4, 16).restore({"epoch": 0})


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_are_disjoint_and_form_the_global_batch(count):
    single = _take(TokenBatcher(TOKENS, 8, 16, seed=9), 20)
    procs = [TokenBatcher(TOKENS, 8, 16, seed=9, process_index=i, process_count=count)
             for i in range(count)]
    for step in range(20):
        parts = [p.next() for p in procs]
        assert all(part.shape == (8 // count, 17) for part in parts)
        starts = [set(part[:, 0]) for part in parts]
        assert len(set().union(*starts)) == 8  # disjoint
        np.testing.assert_array_equal(np.concatenate(parts), single[step])
    assert all(p.state() == procs[0].state() for p in procs)


def test_batcher_errors():
    with pytest.raises(DataError, match="batch_size 6 is not divisible by the process count 4"):
        TokenBatcher(TOKENS, 6, 16, process_index=0, process_count=4)
    with pytest.raises(DataError, match="62 windows of seq_len 16, fewer than batch_size 64"):
        TokenBatcher(TOKENS, 64, 16)
    with pytest.raises(DataError, match="process_index 2 is outside"):
        TokenBatcher(TOKENS, 4, 16, process_index=2, process_count=2)
