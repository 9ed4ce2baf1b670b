"""The inference engine: continuous batching over a preallocated absorbed-MLA latent cache.

Requests wait in a bounded queue; each scheduler step (`Engine.step`, or the background thread
from `Engine.start`) frees the slots of finished or cancelled requests, admits queued prompts
into free slots, prefills the admitted prompts (with `prefill_chunk=N`, N tokens of each
prompt still prefilling per step, so a long prompt is prefilled over several steps and the
other requests keep decoding in between), then runs ONE decode step over the slots that are
done prefilling (one or two tokens per slot with MTP speculative decoding). Device programs
live in dsv3_jax/serve/steps.py; their shapes are fixed (prefills bucketed by batch, chunk
length and cache window), so there is no recompile per token or request. Token bookkeeping
(stop tokens, stop strings, lengths) is host-side here.

While the slots hold the same requests, decode steps are chained on the device: step n + 1 is
dispatched with step n's tokens and positions as device arrays, and the host reads step n's
tokens while n + 1 runs, so the host's dispatch and bookkeeping overlap the device's work (on
CPU dispatch costs about as much as a small model's step). A request that stops at step n has
had step n + 1 computed for it too; that token is dropped. A change of slots (admission, a
finished or cancelled request) first reads the step in flight.

Admission fills the lowest free slots, and a decode step covers only the slots up to a bucket
past the last busy one. A prompt that starts like one still in the cache reuses its rows
(dsv3_jax/serve/prefix_cache.py). Penalties and logprobs are computed on the device from a
per-slot token history (dsv3_jax/serve/penalties.py). A prefill that fails is retried one
prompt at a time, so a failure finishes only the request that causes it; a step that fails
otherwise fails the active requests and reallocates the cache, and HEALTH_FAILURES such steps
in a row make `healthy` false (HTTP /health 503).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.serve import cache as kv
from dsv3_jax.serve import steps
from dsv3_jax.serve.penalties import History
from dsv3_jax.serve.prefix_cache import PrefixIndex
from dsv3_jax.serve.slot_params import SlotParams
from dsv3_jax.serve.request import QueueFull, Request, RequestError, SamplingParams, validate
from dsv3_jax.serve.sampling import SamplingArrays
from sharding.rules import batch_axes

__all__ = ["Engine", "QueueFull", "Request", "RequestError", "SamplingParams"]

MIN_PREFILL = 16  # shortest prompt bucket
MIN_WINDOW = 128  # shortest cache prefix a decode step attends over
HEALTH_FAILURES = 3  # scheduler steps failing in a row before /health says unhealthy


def _records(arrays, row: int, n: int, k: int | None) -> list | None:
    """The first `n` (logprob, top ids, top logprobs) records of `row` from host arrays
    ([rows, steps], [rows, steps, K], [rows, steps, K]), top lists cut to `k`."""
    if k is None:
        return None
    chosen, ids, lps = arrays
    return [(float(chosen[row, j]), ids[row, j, :k].tolist(), lps[row, j, :k].tolist()) for j in range(n)]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass
class _InFlight:
    """A dispatched decode step whose tokens the host has not read yet."""

    requests: tuple             # each slot's request when it was dispatched (None: idle slot)
    tokens: jax.Array           # [slots], or [slots, 2] speculative
    accepted: jax.Array | None  # [slots] bool, speculative: whether the second token counts
    last: jax.Array             # the next step's inputs, on the device
    pos: jax.Array
    active: jax.Array
    advance: int                # the most positions a slot moves in this step
    logprobs: tuple | None = None  # steps.token_logprobs of the step, when a slot asked for them


class Engine:
    """Serve a `Transformer`: `submit` prompts, tokens stream back (see the module docstring)."""

    def __init__(self, model, *, max_seq_len: int, max_batch: int, mesh=None,
                 speculative: bool | None = None, max_queue: int = 256,
                 detokenize: Callable[[list[int]], str] | None = None,
                 prefill_chunk: int | None = None, prefix_cache: bool = True):
        cfg = self.cfg = model.cfg
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1 and max_seq_len ({max_seq_len}) >= 2")
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of "
                             f"{cfg.max_position_embeddings} positions (max_position_embeddings)")
        self.shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
        if max_batch % self.shards:
            raise ValueError(f"max_batch {max_batch} is not divisible by the {self.shards} shards "
                             f"of the mesh's batch axes {batch_axes(mesh)}")
        has_mtp = len(model.mtp) > 0
        if speculative and not has_mtp:
            raise ValueError("speculative decoding drafts with the MTP layer, and this model has "
                             "none (num_nextn_predict_layers = 0)")
        self.speculative = has_mtp if speculative is None else bool(speculative)
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 tokens (or None: whole prompts), got {prefill_chunk}")
        self.max_seq_len, self.max_batch, self.max_queue = max_seq_len, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.mesh, self.detokenize = mesh, detokenize
        self.dtype = model.dtype
        self.cache_bytes_per_token_per_layer = kv.bytes_per_token_per_layer(cfg, self.dtype)
        self._graphdef, self._state = nnx.split(model)
        self._weights, treedef = jax.tree.flatten(self._state)  # what the steps take
        self._prefill_fn, self._decode_fn, self._spec_fn = steps.jitted(self._graphdef, treedef)
        self._prefix = PrefixIndex(max_batch) if prefix_cache else None
        self._copy_fn = jax.jit(kv.copy_prefix, donate_argnums=0)
        self._begin_fn = jax.jit(History.begin, donate_argnums=0)
        self._reset_device_state()
        B = max_batch
        self._slots: list[Request | None] = [None] * B
        self._prefilling: dict[int, int] = {}  # slot -> prompt tokens in its cache so far
        self._last, self._pos = np.zeros(B, np.int32), np.zeros(B, np.int32)
        # per-slot sampling parameters; `self._put` looked up per call (tests count its calls)
        self._params = SlotParams(B, cfg.vocab_size, lambda host: self._put(host))
        self._inflight: _InFlight | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()            # queue and request hand-over
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()       # one scheduler iteration at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failures = 0  # scheduler steps failed in a row
        self._ids = itertools.count()
        # all keys up front: stats() may copy it from another thread while the scheduler counts
        self._stats = collections.Counter(dict.fromkeys(
            ("tokens_generated", "decode_steps", "prefills", "requests_finished", "drafted",
             "accepted", "prefix_cache_hit_tokens", "prefix_cache_query_tokens"), 0))

    # -- public interface ------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a request (thread-safe); raises RequestError for bad input, QueueFull."""
        params = params or SamplingParams()
        prompt = validate(prompt, params, vocab_size=self.cfg.vocab_size,
                          max_len=min(self.max_seq_len, self.cfg.max_position_embeddings),
                          detokenizer=self.detokenize is not None)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            req = Request(next(self._ids), prompt, params, self)
            self._queue.append(req)
            self._wake.notify_all()
        return req

    def start(self) -> None:
        """Run the scheduler in a background daemon thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the scheduler thread; unfinished requests finish as "cancelled"."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._step_lock, self._lock:
            self._thread = None
            self._inflight = None
            self._prefilling.clear()
            for req in self._queue:
                req._finish("cancelled")
            self._queue.clear()
            for i, req in enumerate(self._slots):
                if req is not None:
                    req._finish("cancelled")
                    self._slots[i] = None

    def precompile(self, echo: bool = True) -> int:
        """Compile every program serving can call before serving (dsv3_jax/serve/precompile.py);
        returns how many. Call before `start()`."""
        from dsv3_jax.serve.precompile import precompile
        with self._step_lock:
            return precompile(self, echo)

    @property
    def healthy(self) -> bool:
        """Whether the engine can step: its thread (if started) is alive and the last steps did
        not all fail (a step that fails HEALTH_FAILURES times in a row marks it unhealthy)."""
        thread_ok = self._thread is None or self._thread.is_alive() or self._stopping
        return thread_ok and self._failures < HEALTH_FAILURES

    @property
    def running(self) -> bool:
        """Whether the background scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def step(self) -> bool:
        """One scheduler iteration: free, admit + prefill, one decode step. False when idle."""
        with self._step_lock:
            try:
                busy = self._step()
            except Exception as e:  # fail the affected requests, keep the engine usable
                self._failures += 1
                self._fail_active(f"{type(e).__name__}: {e}")
                raise
            if busy:  # an idle step proves nothing
                self._failures = 0
            return busy

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop=None) -> list[list[int]]:
        """Generate for each prompt (prompt i uses seed + i) and wait; with or without `start()`.

        `stop`: token ids (int) and / or stop strings (str, needs `detokenize`)."""
        stop = [stop] if isinstance(stop, (int, str)) else list(stop or ())
        ids = tuple(s for s in stop if not isinstance(s, str))
        strings = tuple(s for s in stop if isinstance(s, str))
        reqs = [self.submit(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                              top_k=top_k, top_p=top_p, seed=seed + i,
                                              stop_token_ids=ids, stop=strings))
                for i, p in enumerate(prompts)]
        return [r.result() for r in reqs]

    def stats(self) -> dict:
        """Counters: tokens, steps, prefills, speculative acceptance, slots in use, queue."""
        out = dict(self._stats)
        drafted, accepted = out["drafted"], out["accepted"]
        out.update(acceptance_rate=accepted / drafted if drafted else 0.0,
                   speculative=self.speculative,
                   active=sum(r is not None for r in self._slots), queued=len(self._queue),
                   prefilling=len(self._prefilling))
        return out

    # -- scheduler ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                busy = self.step()
            except Exception:  # already reported on the failed requests
                busy = True
            if not busy:
                with self._lock:
                    self._wake.wait_for(lambda: self._stopping or bool(self._queue), timeout=0.05)

    def _step(self) -> bool:
        for i, req in enumerate(self._slots):
            if req is not None and (req._cancelled or req.finish_reason is not None):
                req._finish("cancelled")
                self._slots[i] = None
                self._prefilling.pop(i, None)
        if self._queue and None in self._slots:
            self._drain()  # an admission changes the slots: read the step in flight first
        self._admit()
        prefilled = bool(self._prefilling)
        if prefilled:
            self._prefill()
        if any(r is not None for r in self._decoding()):
            self._decode()
            return True
        return prefilled

    def _decoding(self) -> tuple:
        """Each slot's request if it is done prefilling (else None): the decode steps' slots."""
        return tuple(None if i in self._prefilling else r for i, r in enumerate(self._slots))

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
        prefix = np.zeros(_pow2_at_least(length), np.int32)
        prefix[:length] = req.prompt[:length]
        self._history = self._call(self._begin_fn, self._history, np.int32(slot), prefix, np.int32(length))

    def _sampling(self, rows=None, k: int | None = None) -> SamplingArrays:
        """The sampling arrays of `rows` (host), or of the first `k` slots for a decode step
        (on the device, kept until the next admission)."""
        if rows is None:
            return self._params.first(self.max_batch if k is None else k)
        return self._params.rows(rows)

    def _call(self, fn, *args, **kw):
        if self.mesh is None:
            return fn(*args, **kw)
        with jax.set_mesh(self.mesh):
            return fn(*args, **kw)

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
            s = min(max(MIN_PREFILL, _pow2_at_least(n)), self.max_seq_len)
            window = _pow2_at_least(done + s) if done else 0  # the view must reach start + s
            groups[(s, window)].append((slot, done, n))
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
        rows_n = min(self.shards * _pow2_at_least(-(-len(group) // self.shards)), self.max_batch)
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
            self._commit(slot, [int(first[i])], None if lps is None else _records(lps, i, 1, req.params.logprobs))

    def _put(self, host: np.ndarray) -> jax.Array:
        """A per-slot array on the device, laid out like the slots."""
        return kv.put(host, ("batch",) + (None,) * (np.ndim(host) - 1), self.mesh)

    def _decode(self) -> None:
        """Dispatch one decode step over all slots, then read the previous one (see the module
        docstring); with the same requests in the slots the step's inputs stay on the device."""
        prev, reqs = self._inflight, self._decoding()
        if prev is not None and any(a is not b for a, b in zip(prev.requests, reqs)):
            self._drain()
            prev, reqs = None, self._decoding()
        if prev is not None and all(r is None or len(r.tokens) + 1 >= r.params.max_new_tokens
                                    for r in reqs):
            self._drain()  # the step in flight ends every request: start no other
            return
        act = np.array([r is not None for r in reqs])
        if not act.any():
            return
        # the step covers the first k slots, a bucket past the last busy one (admission fills
        # the lowest free slots), so idle slots beyond cost nothing
        k = self._slots_bucket(int(np.flatnonzero(act)[-1]) + 1)
        if prev is not None and len(prev.requests) != k:
            self._drain()
            prev = None
        act, reqs = act[:k], reqs[:k]
        if prev is not None:
            last, pos, active, lag = prev.last, prev.pos, prev.active, prev.advance
        else:
            last, pos = (self._put(np.where(act, a[:k], 0).astype(np.int32)) for a in (self._last, self._pos))
            active, lag = self._put(act), 0
        sp = self._sampling(k=k)
        # attend over a power-of-two prefix covering every slot's cached positions, so a step
        # costs what the longest context needs, not max_seq_len (one compile per window); the
        # host's positions lag the device's by the step in flight
        furthest = int(self._pos[:k][act].max()) + lag
        window = min(self.max_seq_len, max(MIN_WINDOW, _pow2_at_least(furthest + 1)))
        if self.speculative:
            tokens, accepted, self._cache, self._drafts, last, pos, logits, self._history = self._call(
                self._spec_fn, self._weights, self._cache, self._drafts, last, pos, active, sp,
                window=window, history=self._history)
            advance = 2
        else:
            tokens, logits, self._cache, pos, self._history = self._call(
                self._decode_fn, self._weights, self._cache, last, pos, active, sp, window=window,
                history=self._history)
            last, accepted, advance = tokens, None, 1  # tokens [slots]: no device op to reshape
        lps = None
        if any(r is not None and r.params.logprobs is not None for r in reqs):
            lps = self._call(steps.token_logprobs, logits, tokens, sp)
        self._stats["decode_steps"] += 1
        self._drain()  # read the previous step while this one runs
        self._inflight = _InFlight(reqs, tokens, accepted, last, pos, active, advance, lps)

    def _slots_bucket(self, n: int) -> int:
        """The decode batch for the first `n` slots: a power of two times the batch shards."""
        return min(self.max_batch, self.shards * _pow2_at_least(-(-n // self.shards)))

    def _drain(self) -> None:
        """Read the step in flight and commit its tokens to the requests still in their slots."""
        f, self._inflight = self._inflight, None
        if f is None:
            return
        k = len(f.requests)
        tokens = np.asarray(f.tokens).reshape(k, -1)
        accepted = np.zeros(k, bool) if f.accepted is None else np.asarray(f.accepted)
        records = None
        if f.logprobs is not None:
            per_slot = tokens.shape[1]
            chosen, top_ids, top_lps = (np.asarray(a) for a in f.logprobs)
            chosen = chosen.reshape(k, per_slot)
            top_ids = top_ids.reshape(k, per_slot, -1)
            top_lps = top_lps.reshape(k, per_slot, -1)
            records = (chosen, top_ids, top_lps)
        for slot, req in enumerate(f.requests):
            if req is None or self._slots[slot] is not req:
                continue  # finished, cancelled or replaced since: its token is dropped
            if self.speculative:
                self._stats["drafted"] += 1
                self._stats["accepted"] += int(accepted[slot])
            n = 1 + int(accepted[slot])
            self._last[slot], self._pos[slot] = tokens[slot, n - 1], self._pos[slot] + n
            self._commit(slot, [int(t) for t in tokens[slot, :n]],
                         None if records is None else _records(records, slot, n, req.params.logprobs))

    def _commit(self, slot: int, new: list[int], logprobs: list | None = None) -> None:
        """Append tokens to the slot's request up to its first stop condition; free when done."""
        req = self._slots[slot]
        if req.params.logprobs is None:
            logprobs = None
        try:
            reason, kept = req._extend(new, self.detokenize, logprobs)
        except Exception as e:  # noqa: BLE001 -- e.g. its detokenizer failed: that request only
            reason, kept = "error", 0
            req._finish("error", f"{type(e).__name__}: {e}")
        self._stats["tokens_generated"] += kept
        if reason is not None:
            req._finish(reason)
            self._slots[slot] = None
            self._stats["requests_finished"] += 1

    def _reset_device_state(self) -> None:
        B, T = self.max_batch, self.max_seq_len
        model = nnx.merge(self._graphdef, self._state)
        self._cache = kv.allocate(model, B, T, mtp=self.speculative, mesh=self.mesh)
        self._drafts = (steps.DraftState(kv.zeros((B,), jnp.int32, ("batch",), self.mesh),
                                         kv.zeros((B, self.cfg.vocab_size), jnp.float32,
                                                  ("batch", None), self.mesh))
                        if self.speculative else None)
        if getattr(self, "_prefix", None) is not None:
            self._prefix.clear()  # the rows it knows are gone
        self._history = History(kv.zeros((B, self.cfg.vocab_size), jnp.int32, ("batch", None), self.mesh),
                                kv.zeros((B, self.cfg.vocab_size), jnp.bool_, ("batch", None), self.mesh))

    def _fail_active(self, message: str) -> None:
        self._inflight = None
        self._prefilling.clear()
        for i, req in enumerate(self._slots):
            if req is not None:
                req._finish("error", message)
                self._slots[i] = None
        self._reset_device_state()  # a failed call may have consumed the donated buffers

