"""Prefill scheduling, the engine's side of it: each scheduler step prefills the next chunk of
every prompt still prefilling (`Engine(prefill_chunk=N)`: N tokens; None: the whole rest), one
device call per (chunk bucket, cache window) group (dsv3_jax/serve/buckets.py). A prompt's last
chunk samples its first token (and its MTP draft) and hands its slot to the decode steps; echo
requests collect their prompt logprobs chunk by chunk.

Isolation: a group whose call fails is retried one prompt at a time, so a failure finishes
only the request that causes it; only a failed call that consumed the donated cache fails the
active requests (the engine then reallocates the cache).

`Prefill` is a part of `Engine` (dsv3_jax/serve/engine.py), which owns the state it uses: the
slots, `_prefilling` (slot -> prompt tokens in its cache so far), the device state.
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from dsv3_jax.serve import steps
from dsv3_jax.serve.buckets import prefill_shape, rows_bucket


def records(arrays, row: int, n: int, k: int | None) -> list | None:
    """The first `n` (logprob, top ids, top logprobs) records of `row` from host arrays
    ([rows, steps], [rows, steps, K], [rows, steps, K]), top lists cut to `k`."""
    if k is None:
        return None
    chosen, ids, lps = arrays
    return [(float(chosen[row, j]), ids[row, j, :k].tolist(), lps[row, j, :k].tolist()) for j in range(n)]


class Prefill:
    """The prefill half of the scheduler step (mixed into `Engine`)."""

    def _prefill(self) -> None:
        """The next chunk of every prompt still prefilling (the whole rest without
        `prefill_chunk`), in one call per (chunk bucket, cache window); a prompt's last chunk
        samples its first token and hands the slot to the decode steps."""
        groups = collections.defaultdict(list)
        for slot, done in self._prefilling.items():
            prompt = self._slots[slot].prompt
            n = len(prompt) - done
            if self.prefill_chunk is not None:
                n = min(n, self.prefill_chunk)
            groups[prefill_shape(done, n, self.max_seq_len)].append((slot, done, n))
        for (s, window), group in sorted(groups.items()):
            self._prefill_isolated(s, window, group)

    def _prefill_isolated(self, s: int, window: int, group: list) -> None:
        """Prefill one group; when it fails, each of its prompts alone, so a failure finishes
        only the request that causes it (the others and the cache carry on). Only when a failed
        call consumed the donated cache are all active requests failed and the cache rebuilt."""
        try:
            self._prefill_group(s, window, group)
            return
        except Exception as e:  # noqa: BLE001
            error = e
        if self._device_state_lost():
            raise error
        if len(group) == 1:
            slot = group[0][0]
            if self._prefix is not None:
                self._prefix.clear(slot)
            self._slots[slot]._finish("error", f"{type(error).__name__}: {error}")
            self._slots[slot] = None
            self._prefilling.pop(slot, None)
            return
        for member in group:
            self._prefill_isolated(s, window, [member])

    def _device_state_lost(self) -> bool:
        leaves = jax.tree.leaves((self._cache, self._drafts, self._history))
        return any(a.is_deleted() for a in leaves)

    def _prefill_group(self, s: int, window: int, group: list) -> None:
        """One prefill call: chunk length bucket `s`, cache view `window`, (slot, done, n) rows."""
        rows_n = rows_bucket(len(group), self.shards, self.max_batch)
        ids, next_ids = np.zeros((rows_n, s), np.int32), np.zeros((rows_n, s), np.int32)
        start, lengths = np.zeros(rows_n, np.int32), np.ones(rows_n, np.int32)
        final = np.zeros(rows_n, bool)
        rows = np.full(rows_n, self.max_batch, np.int32)  # padding rows write nowhere
        for i, (slot, done, n) in enumerate(group):
            prompt = self._slots[slot].prompt
            ids[i, :n] = prompt[done:done + n]
            after = prompt[done + 1:done + n + 1]
            next_ids[i, :len(after)] = after
            start[i], lengths[i], rows[i] = done, n, slot
            final[i] = done + n == len(prompt)
        reqs = [self._slots[slot] for slot, _, _ in group]
        echo = any(r.params.prompt_logprobs is not None for r in reqs)
        sp = self._sampling(np.where(rows < self.max_batch, rows, 0))
        first, logits, self._cache, self._drafts, self._history, prompt_lps = self._call(
            self._prefill_fn, self._weights, self._cache, self._drafts, ids, next_ids, start,
            lengths, final, rows, sp, window=window, history=self._history, echo=echo)
        lps = None
        if any(r.params.logprobs is not None for r in reqs):
            lps = [np.asarray(a).reshape(rows_n, 1, *a.shape[1:])
                   for a in self._call(steps.token_logprobs, logits, first, sp)]
        if echo:
            prompt_lps = [np.asarray(a) for a in prompt_lps]
        first = np.asarray(first)
        self._stats["prefills"] += 1
        for i, (slot, done, n) in enumerate(group):
            req = self._slots[slot]
            k = req.params.prompt_logprobs
            if k is not None:
                if req.prompt_logprobs is None:
                    req.prompt_logprobs = [None]
                chosen, top_ids, top_lps = prompt_lps
                m = min(n, len(req.prompt) - 1 - done)  # positions whose next token is in the prompt
                req.prompt_logprobs += [(float(chosen[i, j]), top_ids[i, j, :k].tolist(),
                                         top_lps[i, j, :k].tolist()) for j in range(m)]
            if self._prefix is not None:
                self._prefix.set(slot, req.prompt[:done + n],
                                 None if k is None else (k, req.prompt_logprobs))
            if not final[i]:
                self._prefilling[slot] = done + n
                continue
            del self._prefilling[slot]
            if req.params.max_new_tokens == 0:  # prompt logprobs only (echo)
                req._finish("length")
                self._slots[slot] = None
                self._stats["requests_finished"] += 1
                continue
            self._last[slot], self._pos[slot] = first[i], done + n
            self._commit(slot, [int(first[i])], None if lps is None else records(lps, i, 1, req.params.logprobs))
