"""Admission, the engine's side of it: queued requests into free engine slots, each marked as
prefilling from the prompt prefix it can reuse.

Admission fills the lowest free slots (decode steps cover the slots up to a bucket past the
last busy one), or the free slot whose cache rows already hold the longest usable prefix of
the prompt. With prefix caching (dsv3_jax/serve/prefix_cache.py) the reused rows are copied
from their slot (none when it is the new request's own), the penalty history starts from the
reused tokens, and an echo request takes the cached prompt logprob records; a prompt that
shares a longer prefix with one being prefilled right now waits a step for it.

`Admission` is a part of `Engine` (dsv3_jax/serve/engine.py), which owns the queue, the slots
and the device state.
"""

from __future__ import annotations

import numpy as np

from dsv3_jax.serve.buckets import pow2_at_least
from dsv3_jax.serve.request import Request


class Admission:
    """The admission half of the scheduler step (mixed into `Engine`)."""

    def _dequeue(self, req: Request) -> None:
        """Take a cancelled request out of the queue (if it is still waiting there) and finish
        it, so it neither holds a queue place nor waits for a free slot to be told."""
        with self._lock:
            try:
                self._queue.remove(req)
            except ValueError:  # admitted already (its slot is freed by the scheduler) or done
                return
            req._finish("cancelled")

    def _admit(self) -> list[tuple[int, Request]]:
        """Queued requests into free slots (the lowest first, or the one holding the longest
        usable prefix of the prompt), marked as prefilling from the prefix they reuse. A prompt
        that shares a longer prefix with one being prefilled right now waits for it."""
        free = [i for i, r in enumerate(self._slots) if r is None]
        out, waiting = [], []
        coming = [(self._slots[s].prompt, self._slots[s].params.prompt_logprobs) for s in self._prefilling]
        with self._lock:
            while free and self._queue:
                req = self._queue.popleft()
                if req._cancelled:
                    req._finish("cancelled")
                    continue
                src, length = None, 0
                if self._prefix is not None:
                    need = req.params.prompt_logprobs
                    src, length = self._prefix.best(req.prompt, need, prefer=free)
                    if self._prefix.wait_for(req.prompt, length, coming, need):
                        waiting.append(req)
                        continue
                slot = src if src in free else free[0]
                free.remove(slot)
                self._slots[slot] = req
                records = None if src is None else self._prefix.records[src]  # before any is reused
                out.append((slot, req, src, length, records))
                coming.append((req.prompt, req.params.prompt_logprobs))
            self._queue.extendleft(reversed(waiting))
        for slot, req, src, length, records in out:
            self._prefilling[slot] = length
            if self._prefix is not None:
                self._reuse_prefix(slot, req, src, length, records)
            self._params.set(slot, req.params)
        return [(slot, req) for slot, req, *_ in out]

    def _reuse_prefix(self, slot: int, req: Request, src: int | None, length: int, records) -> None:
        """Give `slot` the first `length` cached positions of slot `src` (dsv3_jax/serve/prefix_cache.py)."""
        self._stats["prefix_cache_query_tokens"] += len(req.prompt)
        if not length:
            self._prefix.clear(slot)
            return
        self._stats["prefix_cache_hit_tokens"] += length
        k = req.params.prompt_logprobs
        if k is not None:
            req.prompt_logprobs = [None] + [(lp, ids[:k], lps[:k]) for lp, ids, lps in
                                            records[1][1:length + 1]]
        if src != slot:
            self._cache = self._call(self._copy_fn, self._cache, np.int32(src), np.int32(slot),
                                     np.int32(length))
        self._prefix.set(slot, req.prompt[:length])
        prefix = np.zeros(pow2_at_least(length), np.int32)
        prefix[:length] = req.prompt[:length]
        self._history = self._call(self._begin_fn, self._history, np.int32(slot), prefix, np.int32(length))
