"""Prefix caching: a prompt that starts like one whose latent cache rows are still in a slot
reuses those rows instead of prefilling them again (lm-eval, for one, sends many continuations
of one context; chat requests share a system prompt).

`PrefixIndex` is the host-side record of which prompt tokens each slot's cache rows hold
(positions [0, len)), kept from a request's prefill until another request is admitted into the
slot, and, for echo requests, the prompt logprob records computed for them. The engine asks it
for the slot with the longest usable prefix of a new prompt, copies those rows into the new
request's slot (dsv3_jax/serve/cache.py `copy_prefix`; none when it is the free slot itself)
and prefills only the rest. Usable: shared tokens minus one, since with MTP a position's entry
also depends on the token after it, and at least one prompt token is left to prefill (its
logits give the first generated token). The entries are the same as a full prefill's (the same
tokens at the same positions), so greedy output equals the plain path's.
"""

from __future__ import annotations

MIN_HIT = 16  # shortest prefix worth a copy and a windowed prefill


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixIndex:
    """Per slot: the prompt tokens its cache rows hold and their prompt logprob records."""

    def __init__(self, slots: int, min_hit: int = MIN_HIT):
        self.min_hit = min_hit
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.records: list[tuple[int, list] | None] = [None] * slots  # (k, records) for echo

    def clear(self, slot: int | None = None) -> None:
        """Forget a slot's rows (all slots: the cache was reallocated)."""
        for s in range(len(self.tokens)) if slot is None else [slot]:
            self.tokens[s], self.records[s] = [], None

    def set(self, slot: int, tokens: list[int], records: tuple[int, list] | None = None) -> None:
        self.tokens[slot], self.records[slot] = tokens, records

    def usable(self, prompt: list[int], slot: int, need_k: int | None) -> int:
        """How many leading positions of `prompt` slot `slot` can give (0: below MIN_HIT)."""
        n = min(_common(prompt, self.tokens[slot]) - 1, len(prompt) - 1)
        if need_k is not None:  # echo: the cached positions' logprob records are needed too
            rec = self.records[slot]
            if rec is None or rec[0] < need_k:
                return 0
            n = min(n, len(rec[1]) - 1)
        return n if n >= self.min_hit else 0

    def best(self, prompt: list[int], need_k: int | None, prefer=()) -> tuple[int | None, int]:
        """(slot, positions) of the longest usable prefix; ties go to slots in `prefer` (free
        ones: no copy). (None, 0) without one."""
        best, length = None, 0
        for slot in range(len(self.tokens)):
            n = self.usable(prompt, slot, need_k)
            if n > length or (n == length and n and slot in prefer and best not in prefer):
                best, length = slot, n
        return best, length

    def wait_for(self, prompt: list[int], length: int, coming: list[tuple[list[int], int | None]],
                 need_k: int | None) -> bool:
        """Whether `prompt` should wait a step: a prompt being prefilled now (`coming`: prompt,
        its prompt-logprobs k) shares at least MIN_HIT more positions than the cache has now."""
        for other, k in coming:
            if need_k is not None and (k is None or k < need_k):
                continue
            if min(_common(prompt, other) - 1, len(prompt) - 1) >= length + self.min_hit:
                return True
        return False

