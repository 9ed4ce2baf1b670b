"""Compile every program serving can call before serving, instead of on the engine thread
while requests wait: each prefill bucket (chunk length x batch rows [x cache window with
chunked prefill], with and without prompt logprobs when `echo`) and each decode step (slots
covered x cache window). Each program runs once on padding rows and idle slots, which write
nothing. With JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) a restart loads
them instead. Prefills after a prefix-cache hit (a window per hit length) still compile on
first use: their number grows with the context, not with the buckets.
"""

from __future__ import annotations

import jax
import numpy as np

from dsv3_jax.serve.engine import MIN_PREFILL, MIN_WINDOW, _pow2_at_least


def precompile(engine, echo: bool = True) -> int:
    """Run every bucket's program once on `engine` (idle, its step lock held); returns how many."""
    if any(r is not None for r in engine._slots):
        raise RuntimeError("precompile() needs an idle engine (call it before serving)")
    B, T = engine.max_batch, engine.max_seq_len
    lengths = sorted({min(max(MIN_PREFILL, 1 << i), T) for i in range(T.bit_length() + 1)})
    rows = sorted({min(engine.shards * _pow2_at_least(-(-n // engine.shards)), B) for n in range(1, B + 1)})
    windows = sorted({min(T, max(MIN_WINDOW, 1 << i)) for i in range(T.bit_length() + 1)})
    chunked = engine.prefill_chunk is not None
    count = 0
    for s in lengths:
        views = [0] + (sorted({_pow2_at_least(d + s) for d in range(1, T)}) if chunked else [])
        for n in rows:
            sp = engine._sampling(np.zeros(n, np.int32))
            z = np.zeros((n, s), np.int32)
            for window in views:
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
        for window in windows:
            if engine.speculative:
                out = engine._call(engine._spec_fn, engine._weights, engine._cache, engine._drafts,
                                   zeros, zeros, idle, sp, window=window, history=engine._history)
                engine._cache, engine._drafts, engine._history = out[2], out[3], out[7]
            else:
                out = engine._call(engine._decode_fn, engine._weights, engine._cache, zeros, zeros,
                                   idle, sp, window=window, history=engine._history)
                engine._cache, engine._history = out[2], out[4]
            count += 1
    jax.block_until_ready(engine._cache)
    return count
