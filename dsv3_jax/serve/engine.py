"""The inference engine: continuous batching over a preallocated absorbed-MLA latent cache.

Requests wait in a bounded queue; each scheduler step (`Engine.step`, or the background thread
from `Engine.start`) frees the slots of finished or cancelled requests, admits queued prompts
into free slots (dsv3_jax/serve/admission.py), prefills the next chunk of every admitted prompt
(dsv3_jax/serve/prefill.py: `prefill_chunk` tokens, DEFAULT_PREFILL_CHUNK = 512 unless told
otherwise, None for whole prompts, so a long prompt is prefilled over several steps and the
other requests keep decoding in between), then runs ONE decode step over the slots that are
done prefilling (one or two tokens per slot with MTP speculative decoding). Device programs
live in dsv3_jax/serve/steps.py; their shapes are bucketed (dsv3_jax/serve/buckets.py), so
there is no recompile per token or request. Token bookkeeping (stop tokens, stop strings,
lengths) is host-side here.

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
from dsv3_jax.serve.admission import Admission
from dsv3_jax.serve.buckets import DEFAULT_PREFILL_CHUNK, decode_window, rows_bucket
from dsv3_jax.serve.penalties import History
from dsv3_jax.serve.prefill import Prefill, records
from dsv3_jax.serve.prefix_cache import PrefixIndex
from dsv3_jax.serve.slot_params import SlotParams
from dsv3_jax.serve.request import QueueFull, Request, RequestError, SamplingParams, validate
from dsv3_jax.serve.sampling import SamplingArrays
from sharding.rules import batch_axes

__all__ = ["DEFAULT_PREFILL_CHUNK", "Engine", "QueueFull", "Request", "RequestError", "SamplingParams"]


HEALTH_FAILURES = 3  # scheduler steps failing in a row before /health says unhealthy


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


class Engine(Admission, Prefill):
    """Serve a `Transformer`: `submit` prompts, tokens stream back (see the module docstring).

    `prefill_chunk`: prompt tokens prefilled per scheduler step (None: whole prompts in one
    step, stalling the running streams meanwhile); `prefix_cache`: reuse the cache rows of a
    previous prompt's shared prefix (False: prefill every prompt in full)."""

    def __init__(self, model, *, max_seq_len: int, max_batch: int, mesh=None,
                 speculative: bool | None = None, max_queue: int = 256,
                 detokenize: Callable[[list[int]], str] | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, prefix_cache: bool = True):
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

    def precompile(self, echo: bool = True, prefix_hits: bool = False) -> int:
        """Compile every program serving can call before serving (dsv3_jax/serve/precompile.py;
        `prefix_hits`: the prefills after a reused prefix too); returns how many. Call before
        `start()`."""
        from dsv3_jax.serve.precompile import precompile
        with self._step_lock:
            return precompile(self, echo, prefix_hits)

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
        window = decode_window(furthest, self.max_seq_len)
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
        return rows_bucket(n, self.shards, self.max_batch)

    def _drain(self) -> None:
        """Read the step in flight and commit its tokens to the requests still in their slots."""
        f, self._inflight = self._inflight, None
        if f is None:
            return
        k = len(f.requests)
        tokens = np.asarray(f.tokens).reshape(k, -1)
        accepted = np.zeros(k, bool) if f.accepted is None else np.asarray(f.accepted)
        recs = None
        if f.logprobs is not None:
            per_slot = tokens.shape[1]
            chosen, top_ids, top_lps = (np.asarray(a) for a in f.logprobs)
            chosen = chosen.reshape(k, per_slot)
            top_ids = top_ids.reshape(k, per_slot, -1)
            top_lps = top_lps.reshape(k, per_slot, -1)
            recs = (chosen, top_ids, top_lps)
        for slot, req in enumerate(f.requests):
            if req is None or self._slots[slot] is not req:
                continue  # finished, cancelled or replaced since: its token is dropped
            if self.speculative:
                self._stats["drafted"] += 1
                self._stats["accepted"] += int(accepted[slot])
            n = 1 + int(accepted[slot])
            self._last[slot], self._pos[slot] = tokens[slot, n - 1], self._pos[slot] + n
            self._commit(slot, [int(t) for t in tokens[slot, :n]],
                         None if recs is None else records(recs, slot, n, req.params.logprobs))

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

