"""Packing whole documents into training rows with segment ids (`train.py --pack-documents`).

The corpus is the flat token array of dsv3_jax/data.py: every document followed by EOS. A
document of L tokens (EOS included) gives pieces of at most seq_len + 1 tokens that start
seq_len apart, so consecutive pieces share one token (the last target of a piece is the first
input of the next) and every token after the document's first is a target exactly once, as in
`TokenBatcher`'s windows:
- `(L - 1) // seq_len` full pieces, each a row of its own;
- the rest, `(L - 1) % seq_len + 1` tokens when that is at least 2 (a 1-token rest has nothing
  left to predict), packed with other short pieces.
Each epoch the documents are ordered by a permutation seeded by (seed, epoch), short pieces are
packed in that order into rows (next fit: a piece that does not fit closes the row, whose tail is
padding), and the rows (full and packed) are shuffled by the same generator. A row holds its
pieces' tokens with segment ids 1, 2, ... in order and `PAD_ID` tokens with segment id 0 after
them. Positions restart at 0 at each piece (`dsv3_jax.model.segment_positions`); the loss
scores a prediction only within a piece (dsv3_jax/train/losses.py).

`DocumentPacker` is seeded and resumable like `TokenBatcher`: `state()` goes into the
checkpoint, `restore` continues with the same future batches, every process reads its own
contiguous slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from jaxtyping import Int32, Integer

from dsv3_jax.data import EOS_ID, PAD_ID, DataError, check_batching, check_same_batches


def document_spans(tokens: Integer[np.ndarray, " tokens"], eos_id: int = EOS_ID
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the documents of a flat token array, each ending with its EOS (a
    tail without EOS is a document too)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]])
    keep = ends > starts
    return starts[keep].astype(np.int64), (ends - starts)[keep].astype(np.int64)


def pack_rows(starts: np.ndarray, lengths: np.ndarray, seq_len: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's rows: (piece starts, piece lengths, row offsets), row r holding pieces
    `offsets[r]:offsets[r + 1]`; documents in `rng`'s order, rows shuffled by it (module
    docstring)."""
    row = seq_len + 1
    order = rng.permutation(len(starts))
    starts, lengths = starts[order], lengths[order]
    full = (lengths - 1) // seq_len
    rest = (lengths - 1) % seq_len + 1
    # full pieces: one row each, in document order
    doc = np.repeat(np.arange(len(starts)), full)
    within = np.arange(len(doc)) - np.repeat(np.cumsum(full) - full, full)
    full_starts = starts[doc] + within * seq_len
    # the rests (and short documents), next fit
    short = rest >= 2
    s_starts, s_lens = (starts + full * seq_len)[short], rest[short]
    row_of = np.empty(len(s_lens), np.int64)
    used, current = 0, 0
    for i, n in enumerate(s_lens.tolist()):
        if used + n > row:
            current, used = current + 1, 0
        row_of[i] = current
        used += n
    n_packed = current + 1 if len(s_lens) else 0
    piece_starts = np.concatenate([full_starts, s_starts])
    piece_lens = np.concatenate([np.full(len(full_starts), row), s_lens])
    counts = np.concatenate([np.ones(len(full_starts), np.int64),
                             np.bincount(row_of, minlength=n_packed)])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    perm = rng.permutation(len(counts))  # shuffle the rows: move each row's pieces together
    new_counts = counts[perm]
    new_offsets = np.concatenate([[0], np.cumsum(new_counts)])
    gather = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in perm]) \
        if len(perm) else np.zeros(0, np.int64)
    return piece_starts[gather], piece_lens[gather], new_offsets


class DocumentPacker:
    """Seeded, resumable packed rows: (tokens, segment ids), each [batch_per_process, seq_len + 1].

    Segment ids number a row's pieces 1, 2, ...; 0 marks padding (token `pad_id`). Each epoch
    drops its last partial global batch, like `TokenBatcher`."""

    def __init__(self, tokens: Integer[np.ndarray, " tokens"], batch_size: int, seq_len: int,
                 seed: int = 0, *, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                 process_index: int = 0, process_count: int = 1):
        check_batching(batch_size, seq_len, process_index, process_count)
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.pad_id = pad_id
        self.process_index, self.process_count = process_index, process_count
        self.batch_per_process = batch_size // process_count
        self._docs = document_spans(tokens, eos_id)
        self.epoch, self.position = 0, 0
        self._rows_epoch, self._rows = -1, None
        self._check_rows()

    def _check_rows(self) -> None:
        rows = len(self._layout()[2]) - 1
        if rows < self.batch_size:
            raise DataError(f"corpus of {len(self.tokens)} tokens ({len(self._docs[0])} documents) "
                            f"packs into {rows} rows of seq_len {self.seq_len} + 1 in epoch "
                            f"{self.epoch}, fewer than batch_size {self.batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        """Global batches of the current epoch (the packed row count varies a little by epoch)."""
        return (len(self._layout()[2]) - 1) // self.batch_size

    def _layout(self):
        if self._rows_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._rows, self._rows_epoch = pack_rows(*self._docs, self.seq_len, rng), self.epoch
        return self._rows

    def padding_fraction(self) -> float:
        """The share of this epoch's row tokens that are padding."""
        _, lens, offsets = self._layout()
        rows = len(offsets) - 1
        return 1.0 - float(lens.sum()) / max(rows * (self.seq_len + 1), 1)

    def next(self) -> tuple[Int32[np.ndarray, "batch_per_process window"],
                            Int32[np.ndarray, "batch_per_process window"]]:
        """This process's slice of the next global batch: (tokens, segment ids)."""
        starts, lens, offsets = self._layout()
        first = self.position * self.batch_size + self.process_index * self.batch_per_process
        width = self.seq_len + 1
        tokens = np.full((self.batch_per_process, width), self.pad_id, np.int32)
        segments = np.zeros((self.batch_per_process, width), np.int32)
        for i, r in enumerate(range(first, first + self.batch_per_process)):
            at = 0
            for seg, p in enumerate(range(offsets[r], offsets[r + 1]), start=1):
                n = int(lens[p])
                tokens[i, at:at + n] = self.tokens[starts[p]:starts[p] + n]
                segments[i, at:at + n] = seg
                at += n
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._check_rows()
        return tokens, segments

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next()

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position; `restore` of it continues with the same future batches."""
        return {"packed": True, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "num_tokens": len(self.tokens)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a packer over the same tokens, batch size and seq_len."""
        if "conversations" in state:
            raise DataError("the checkpoint's run fine-tuned on chat data; resume it with --sft")
        if not state.get("packed"):
            raise DataError("the checkpoint's run read contiguous windows, not packed documents; "
                            "resume it without --pack-documents")
        check_same_batches(state, self.batch_size, self.seq_len, len(self.tokens))
        if state["epoch"] < 0:
            raise DataError(f"data state epoch={state['epoch']} is negative")
        previous = self.seed, self.epoch, self.position
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), \
            int(state["position"])
        self._rows_epoch = -1  # the seed may differ
        if not 0 <= self.position < self.batches_per_epoch:
            batches = self.batches_per_epoch
            self.seed, self.epoch, self.position = previous
            self._rows_epoch = -1
            raise DataError(f"data state epoch={state['epoch']} position={state['position']} is "
                            f"outside this corpus ({batches} batches in that epoch)")
