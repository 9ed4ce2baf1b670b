"""Corpora, tokenizers and batching for training.

A corpus is a list of files: plain text (one document per file) or `.jsonl` (one document per
line, in its "text" field). `corpus_files(None)` is the embedded default corpus, the running
interpreter's own standard library sources, so `python train.py` needs no download. A byte-level
BPE is trained on the corpus with the `tokenizers` library and cached, the corpus is encoded
once into a flat token array (cached as `.npy` next to the tokenizer), and `TokenBatcher` cuts
that array into seeded, resumable [batch, seq_len + 1] windows for next-token training (the
DeepSeek-V3 recipe: windows cross document boundaries). `dsv3_jax.packing.DocumentPacker`
instead packs whole documents into rows with segment ids (`train.py --pack-documents`).

Caches are keyed on the corpus file list and sizes (not contents: an edit that keeps a file's
size reuses a stale cache; delete the cache dir to refresh). Writes are atomic, so processes
that train the same (deterministic) tokenizer at once do not read each other's half files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int32, Integer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2: configs/tiny.json has bos 0, eos 1
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
_CACHE_VERSION = "dsv3-jax-data-v1"  # bump when the tokenizer recipe or token format changes
_ENCODE_CHUNK_BYTES = 8 << 20


class DataError(ValueError):
    """A corpus, tokenizer or batching input cannot be used; the message names the path/value."""


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """The tokenizer/token cache: $XDG_CACHE_HOME (or ~/.cache) / dsv3-jax / tokenizers."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dsv3-jax" / "tokenizers"


# ------------------------------------------------------------------------------------ corpora

def stdlib_files() -> list[Path]:
    """The running interpreter's standard library `*.py` files, sorted; no site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(root).parts))


def corpus_files(source: str | os.PathLike | None) -> list[Path]:
    """The corpus files of `source`: None = stdlib sources; a text/.jsonl file; or a folder."""
    if source is None:
        files = stdlib_files()
        where = Path(sysconfig.get_paths()["stdlib"])
    else:
        where = Path(source).expanduser()
        if where.is_file():
            files = [where]
        elif where.is_dir():
            # Hidden files and folders (.git, .cache) are never corpus.
            files = sorted(p for p in where.rglob("*") if p.is_file()
                           and p.suffix.lower() in (*TEXT_SUFFIXES, JSONL_SUFFIX)
                           and not any(part.startswith(".") for part in p.relative_to(where).parts))
            if not files:
                raise DataError(f"corpus folder {where} has no text or .jsonl files "
                                f"(suffixes {', '.join((*TEXT_SUFFIXES, JSONL_SUFFIX))})")
        else:
            raise DataError(f"corpus path {where} does not exist")
    if not files or all(p.stat().st_size == 0 for p in files):
        raise DataError(f"corpus {where} is empty")
    return files


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: line has no string \"text\" field")
            yield record["text"]


def read_documents(files: Sequence[Path]) -> Iterator[str]:
    """Documents in order: a whole text file, or each .jsonl line's "text" (bad UTF-8 -> U+FFFD)."""
    for path in files:
        path = Path(path)
        try:
            if path.suffix.lower() == JSONL_SUFFIX:
                yield from _read_jsonl(path)
            else:
                # Bytes, not read_text: universal newlines would turn "\r\n" into "\n".
                yield path.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read corpus file {path}: {e.strerror}") from None


def _corpus_key(files: Sequence[Path], *extra: Any) -> str:
    listing = [(str(Path(p).resolve()), Path(p).stat().st_size) for p in files]
    blob = json.dumps([_CACHE_VERSION, listing, *extra]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------- tokenizers

def _train_bpe(docs: Iterator[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Byte-level and no prefix space: decode(encode(s)) == s for any string.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


def load_or_train_tokenizer(files: Sequence[Path], vocab_size: int, *,
                            cache_dir: str | os.PathLike | None = None,
                            tokenizer_path: str | os.PathLike | None = None) -> Tokenizer:
    """A byte-level BPE: loaded from `tokenizer_path`, else from the cache, else trained on `files`.

    Training reads the whole corpus (the stdlib's ~32 MB takes ~10 s on 2 cores) and is
    deterministic. `tokenizer_path` may be a tokenizer.json or a checkpoint folder holding one;
    its vocabulary must fit in `vocab_size`.
    """
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception
            raise DataError(f"tokenizer file {path} cannot be read: {e}") from None
        if tok.get_vocab_size() > vocab_size:
            raise DataError(f"tokenizer {path} has {tok.get_vocab_size()} tokens, more than the "
                            f"model's vocab_size {vocab_size}")
        return tok

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE "
                        f"(needs at least {min_vocab}: 256 bytes + special tokens)")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"{_corpus_key(files, vocab_size)}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 -- as above; a torn cache file is retrained
            _log(f"cached tokenizer {path} is unreadable ({e}); retraining")
    size_mb = sum(Path(p).stat().st_size for p in files) / 1e6
    _log(f"training a {vocab_size}-token byte-level BPE on {len(files)} files ({size_mb:.1f} MB)")
    t0 = time.perf_counter()
    tok = _train_bpe(read_documents(files), vocab_size)
    _atomic_write(path, lambda f: f.write(tok.to_str().encode()))
    _log(f"trained in {time.perf_counter() - t0:.1f} s -> {path}")
    return tok


# ---------------------------------------------------------------------------------- encoding

def _chunks(docs: Iterator[str], max_bytes: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def document_markers(bos_token_id: int | None, eos_token_id: int | list[int] | None,
                     tokenizer: Tokenizer) -> tuple[int | None, int]:
    """(BOS, EOS) ids that frame each document, from a model config's `bos_token_id` and
    `eos_token_id` (the first of a list): DeepSeek's convention is BOS + text + EOS. No BOS when
    the config has none; an id the tokenizer does not define is an error."""
    eos = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
    if eos is None or isinstance(eos, list):
        raise DataError("the model config has no eos_token_id: documents need an end-of-text "
                        "token to separate them")
    for name, i in (("bos_token_id", bos_token_id), ("eos_token_id", eos)):
        if i is not None and tokenizer.id_to_token(i) is None:
            raise DataError(f"the model config's {name} {i} is not a token of the tokenizer "
                            f"({tokenizer.get_vocab_size()} tokens); use a config and --tokenizer "
                            "that belong together")
    return bos_token_id, eos


def encode_corpus(files: Sequence[Path], tokenizer: Tokenizer, *, eos_id: int = EOS_ID,
                  bos_id: int | None = None, cache_dir: str | os.PathLike | None = None
                  ) -> Integer[np.ndarray, " tokens"]:
    """Token ids of all documents concatenated, each followed by `eos_id` (and preceded by
    `bos_id` when given, `document_markers`); cached as .npy.

    The dtype is uint16 when the vocabulary fits, else int32. The cached array is memory-mapped.
    """
    vocab = tokenizer.get_vocab_size()
    for name, i in (("eos_id", eos_id), ("bos_id", bos_id)):
        if i is not None and not 0 <= i < vocab:
            raise DataError(f"{name} {i} is outside the tokenizer's vocabulary [0, {vocab})")
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:20]
    key = _corpus_key(files, tok_hash, eos_id) if bos_id is None else \
        _corpus_key(files, tok_hash, eos_id, bos_id)  # the older key when there is no BOS
    path = cache / f"{key}.tokens.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            _log(f"cached tokens {path} are unreadable ({e}); re-encoding")

    t0 = time.perf_counter()
    parts, n_docs, n_chars = [], 0, 0
    for chunk in _chunks(read_documents(files), _ENCODE_CHUNK_BYTES):
        for enc in tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
            if bos_id is not None:
                parts.append(np.asarray([bos_id], dtype=dtype))
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(np.asarray([eos_id], dtype=dtype))
        n_docs += len(chunk)
        n_chars += sum(map(len, chunk))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if len(tokens) == n_docs * (1 + (bos_id is not None)):  # nothing but the markers
        where = files[0] if len(files) == 1 else f"{len(files)} files from {files[0]}"
        raise DataError(f"corpus {where} has no text to train on")
    _atomic_write(path, lambda f: np.save(f, tokens))
    _log(f"encoded {n_docs} documents ({n_chars / 1e6:.1f} M chars) into {len(tokens):,} tokens "
         f"in {time.perf_counter() - t0:.1f} s -> {path}")
    return tokens


# ---------------------------------------------------------------------------------- batching

def check_batching(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
    """Raise DataError unless the sizes are positive and the batch splits over the processes."""
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size {batch_size} and seq_len {seq_len} must be positive")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, {process_count})")
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} is not divisible by the process count "
                        f"{process_count}")


def check_same_batches(state: dict[str, Any], batch_size: int, seq_len: int, num_tokens: int) -> None:
    """Raise DataError unless a checkpoint's data `state` has a position and was cut from the
    same tokens into the same batch and sequence sizes as this run's."""
    missing = {"seed", "epoch", "position"} - set(state)
    if missing:
        raise DataError(f"data state {state} lacks {sorted(missing)}")
    for field, mine in (("batch_size", batch_size), ("seq_len", seq_len), ("num_tokens", num_tokens)):
        if field in state and state[field] != mine:
            raise DataError(f"data state has {field}={state[field]} but this run has {mine}; "
                            f"resuming would not continue the same batches")


class TokenBatcher:
    """Seeded, resumable next-token windows [batch_per_process, seq_len + 1] from a token array.

    Window starts are the non-overlapping multiples of seq_len; each epoch visits them in a fresh
    permutation seeded by (seed, epoch) and drops the last partial global batch. Every process
    takes its own contiguous slice of each global batch, so the processes together read exactly
    the batch one process would read alone, and `state()` is the same on every process.
    """

    def __init__(self, tokens: Integer[np.ndarray, " tokens"], batch_size: int, seq_len: int,
                 seed: int = 0, *, process_index: int = 0, process_count: int = 1):
        check_batching(batch_size, seq_len, process_index, process_count)
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.process_index, self.process_count = process_index, process_count
        self.batch_per_process = batch_size // process_count
        self.num_windows = max(len(tokens) - 1, 0) // seq_len
        if self.num_windows < batch_size:
            raise DataError(f"corpus of {len(tokens)} tokens has {self.num_windows} windows of "
                            f"seq_len {seq_len}, fewer than batch_size {batch_size}")
        self.batches_per_epoch = self.num_windows // batch_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), self.epoch
        return self._perm

    def next(self) -> Int32[np.ndarray, "batch_per_process window"]:
        """This process's slice of the next global batch; windows are seq_len + 1 tokens."""
        first = self.position * self.batch_size + self.process_index * self.batch_per_process
        windows = self._permutation()[first:first + self.batch_per_process]
        index = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        batch = np.asarray(self.tokens[index], dtype=np.int32)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next()

    def state(self) -> dict[str, int]:
        """JSON-serialisable position; `restore` of it continues with the same future batches."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "num_tokens": len(self.tokens)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a batcher over the same tokens, batch size and seq_len."""
        if state.get("packed"):
            raise DataError("the checkpoint's run packed documents (dsv3_jax/packing.py); resume "
                            "it with --pack-documents")
        if "conversations" in state:
            raise DataError("the checkpoint's run fine-tuned on chat data; resume it with --sft")
        check_same_batches(state, self.batch_size, self.seq_len, len(self.tokens))
        if not 0 <= state["position"] < self.batches_per_epoch or state["epoch"] < 0:
            raise DataError(f"data state epoch={state['epoch']} position={state['position']} is "
                            f"outside this corpus ({self.batches_per_epoch} batches per epoch)")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), \
            int(state["position"])
