"""Incremental detokenization: the text of a growing list of ids, decoding only a bounded tail.

Decoding the whole output again for every new token costs O(n) per token, O(n^2) per request.
`IncrementalText.push(ids)` decodes only the ids from a few before the last read point (the
context a tokenizer needs to place a leading space, e.g. SentencePiece's "▁") and returns the
text the new ids add: `decode(window)[len(decode(window before them)):]`. A trailing U+FFFD (a
character whose UTF-8 bytes are split over tokens) is held back until the character is complete,
so the pieces concatenate to `decode(all ids)` for byte-level BPE and SentencePiece tokenizers.
"""

from __future__ import annotations

from typing import Callable, Sequence

CONTEXT = 4       # ids decoded before the new ones
MAX_PENDING = 16  # ids held back for an incomplete character before their text is given anyway


class IncrementalText:
    """`push(ids) -> new text`, then `finish() -> the text still held back`."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.start = 0  # decoding windows start here (CONTEXT ids before `read`)
        self.read = 0   # ids whose text has been returned

    def _piece(self) -> str:
        before = self.decode(self.ids[self.start:self.read]) if self.read > self.start else ""
        return self.decode(self.ids[self.start:])[len(before):]

    def push(self, ids: Sequence[int]) -> str:
        """The text these ids complete ('' while a character is incomplete)."""
        self.ids.extend(int(t) for t in ids)
        if len(self.ids) == self.read:
            return ""
        piece = self._piece()
        if piece.endswith("\ufffd") and len(self.ids) - self.read < MAX_PENDING:
            return ""
        self.read = len(self.ids)
        self.start = max(0, self.read - CONTEXT)
        return piece

    def finish(self) -> str:
        """The text of the ids still held back (an incomplete character stays U+FFFD)."""
        if len(self.ids) == self.read:
            return ""
        piece = self._piece()
        self.read = len(self.ids)
        self.start = max(0, self.read - CONTEXT)
        return piece
