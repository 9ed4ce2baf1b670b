"""The shape buckets of the engine's device programs, so nothing compiles per token or request.

A prefill call runs chunks of `s` tokens (a power of two, at least MIN_PREFILL, at most the
context) for a power-of-two number of rows (times the batch shards), over a cache view of
`window` positions (0 when every chunk starts at position 0; else a power of two reaching past
the chunk's end). A decode step covers the first slots up to a bucket past the last busy one,
over a power-of-two window (at least MIN_WINDOW) past the furthest slot's position.

The engine computes its shapes here (dsv3_jax/serve/engine.py, prefill.py) and
`Engine.precompile` (dsv3_jax/serve/precompile.py) enumerates the same sets, so what is
compiled at start-up is what serving calls.
"""

from __future__ import annotations

MIN_PREFILL = 16  # shortest prompt chunk bucket
MIN_WINDOW = 128  # shortest cache prefix a decode step attends over
# Default `Engine(prefill_chunk=...)`: a prompt longer than this is prefilled this many tokens
# per scheduler step, with a decode step for the running requests between its chunks, so a
# long prompt delays their next token by one chunk's prefill, not the whole prompt's. 512
# tokens keep a chunk's matmuls large enough to run near a whole prefill's speed per token.
DEFAULT_PREFILL_CHUNK = 512


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def rows_bucket(n: int, shards: int, max_batch: int) -> int:
    """Rows of a call over `n` prompts or the first `n` slots: a power of two times the shards."""
    return min(max_batch, shards * pow2_at_least(-(-n // shards)))


def prefill_shape(done: int, n: int, max_seq_len: int) -> tuple[int, int]:
    """(chunk bucket s, cache window) of prefilling `n` prompt tokens after the `done` in the cache."""
    s = min(max(MIN_PREFILL, pow2_at_least(n)), max_seq_len)
    return s, (pow2_at_least(done + s) if done else 0)  # the view must reach start + s


def decode_window(furthest: int, max_seq_len: int) -> int:
    """The cache window of a decode step whose furthest slot writes position `furthest`."""
    return min(max_seq_len, max(MIN_WINDOW, pow2_at_least(furthest + 1)))


def prefill_shapes(max_seq_len: int, chunk: int | None, min_hit: int | None) -> list[tuple[int, int]]:
    """Every (s, window) a prefill can use: chunks of at most `chunk` tokens (None: whole
    prompts) starting at 0, at multiples of `chunk`, and, with prefix caching (`min_hit`: its
    shortest reused prefix), after any reused prefix (dsv3_jax/serve/prefix_cache.py)."""
    T = max_seq_len
    longest = T if chunk is None else min(chunk, T)
    starts = {0} | ({k * chunk for k in range(1, -(-T // chunk))} if chunk else set())
    if min_hit is not None:
        starts |= set(range(min_hit, T))
    shapes = set()
    for done in starts:
        top = min(longest, T - done)
        for i in range(top.bit_length() + 1):
            shapes.add(prefill_shape(done, min(1 << i, top), T))
    return sorted(shapes)


def decode_windows(max_seq_len: int) -> list[int]:
    """Every cache window a decode step can use."""
    return sorted({decode_window((1 << i) - 1, max_seq_len) for i in range(max_seq_len.bit_length() + 1)})


def rows_buckets(shards: int, max_batch: int) -> list[int]:
    """Every row count of a prefill call or a decode step."""
    return sorted({rows_bucket(n, shards, max_batch) for n in range(1, max_batch + 1)})
