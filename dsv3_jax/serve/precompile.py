"""Compile every program serving can call before serving, instead of on the engine thread
while requests wait: each prefill bucket (chunk length x batch rows x cache window, with and
without prompt logprobs when `echo`) and each decode step (slots covered x cache window), the
sets serving draws from (dsv3_jax/serve/buckets.py), the later chunks' windows of chunked
prefill included, and with prefix caching its copy and history programs. Each program runs
once on padding rows and idle slots, which write nothing. With JAX's persistent compilation
cache (JAX_COMPILATION_CACHE_DIR) a restart loads them instead.

A prefill after a reused prefix starts at any position, so its windows cross every chunk bucket
(45 shapes instead of 24 for a 4096-token context and 512-token chunks, times batch rows and
echo): they compile on first use unless `prefix_hits=True`.
"""

from __future__ import annotations

import jax
import numpy as np

from dsv3_jax.serve.buckets import decode_windows, pow2_at_least, prefill_shapes, rows_buckets


def precompile(engine, echo: bool = True, prefix_hits: bool = False) -> int:
    """Run every bucket's program once on `engine` (idle, its step lock held); returns how many.
    `echo`: the prompt-logprob variants too; `prefix_hits`: the windows after reused prefixes."""
    if any(r is not None for r in engine._slots):
        raise RuntimeError("precompile() needs an idle engine (call it before serving)")
    B, T = engine.max_batch, engine.max_seq_len
    rows = rows_buckets(engine.shards, B)
    min_hit = engine._prefix.min_hit if engine._prefix is not None and prefix_hits else None
    count = 0
    for s, window in prefill_shapes(T, engine.prefill_chunk, min_hit):
        for n in rows:
            sp = engine._sampling(np.zeros(n, np.int32))
            z = np.zeros((n, s), np.int32)
            for e in (False, True) if echo else (False,):
                out = engine._call(
                    engine._prefill_fn, engine._weights, engine._cache, engine._drafts, z, z,
                    np.zeros(n, np.int32), np.ones(n, np.int32), np.zeros(n, bool),
                    np.full(n, B, np.int32), sp, window=window, history=engine._history, echo=e)
                _, _, engine._cache, engine._drafts, engine._history, _ = out
                count += 1
    for k in rows:
        zeros = engine._put(np.zeros(k, np.int32))
        idle, sp = engine._put(np.zeros(k, bool)), engine._sampling(k=k)
        for window in decode_windows(T):
            if engine.speculative:
                out = engine._call(engine._spec_fn, engine._weights, engine._cache, engine._drafts,
                                   zeros, zeros, idle, sp, window=window, history=engine._history)
                engine._cache, engine._drafts, engine._history = out[2], out[3], out[7]
            else:
                out = engine._call(engine._decode_fn, engine._weights, engine._cache, zeros, zeros,
                                   idle, sp, window=window, history=engine._history)
                engine._cache, engine._history = out[2], out[4]
            count += 1
    if engine._prefix is not None and engine._prefix.min_hit < T:  # a hit copies rows, starts a history
        engine._cache = engine._call(engine._copy_fn, engine._cache, np.int32(0), np.int32(0), np.int32(0))
        count += 1
        for n in sorted({pow2_at_least(n) for n in range(engine._prefix.min_hit, T)}):
            engine._history = engine._call(engine._begin_fn, engine._history, np.int32(0),
                                           np.zeros(n, np.int32), np.int32(0))
            count += 1
    jax.block_until_ready(engine._cache)
    return count
