"""The engine's prefill: expanded blockwise attention, in chunks (`prefill_chunk`) against one
whole-prompt prefill, decode steps of other requests running between a prompt's chunks, prefix
caching and chunked prefill together against the plain path (neither), the default chunk, and
precompile covering every bucket serving then calls."""

import numpy as np
import pytest

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.serve.engine import Engine, SamplingParams
from tests.conftest import FIXTURES, ROOT
from tests.test_serve_engine import full_forward_greedy

TINY = ModelConfig.from_json(ROOT / "configs" / "tiny.json")
MTP_CFG = ModelConfig.from_json(FIXTURES / "v3_mtp").replace(max_position_embeddings=256)
LONG = [int(t) for t in np.random.default_rng(5).integers(3, 250, 45)]
T = 128


def _prefill_only(engine: Engine, prompts) -> int:
    """Admit `prompts` and run prefill calls until every one is done; returns the calls made."""
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=8)) for p in prompts]
    for slot, _ in engine._admit():
        engine._prefilling[slot] = 0
    calls = 0
    while engine._prefilling:
        engine._prefill()
        calls += 1
    return calls, reqs


@pytest.mark.slow  # CI time: the greedy-token test below runs chunked prefill end to end
def test_chunked_prefill_writes_what_one_prefill_writes():
    """Latent caches (main stacks and MTP), first tokens and MTP drafts: a 45-token and a
    16-token prompt prefilled 8 tokens at a time, as in one call each."""
    model = init_model(MTP_CFG, seed=0)
    prompts = [LONG, LONG[3:19]]
    whole = Engine(model, max_seq_len=T, max_batch=2, speculative=True)
    chunked = Engine(model, max_seq_len=T, max_batch=2, speculative=True, prefill_chunk=8)
    calls_whole, reqs_whole = _prefill_only(whole, prompts)
    calls_chunked, reqs_chunked = _prefill_only(chunked, prompts)
    assert calls_whole == 1 and calls_chunked == 6  # ceil(45 / 8)
    assert [r.tokens for r in reqs_chunked] == [r.tokens for r in reqs_whole]
    for name in ("dense", "moe", "mtp"):
        for field in ("c_kv", "k_pe"):
            a = np.asarray(getattr(getattr(whole._cache, name), field))
            b = np.asarray(getattr(getattr(chunked._cache, name), field))
            for slot, p in enumerate(prompts):
                got, want = b[..., slot, :len(p), :], a[..., slot, :len(p), :]
                assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (name, field, slot)
    assert np.array_equal(np.asarray(chunked._drafts.token), np.asarray(whole._drafts.token))
    np.testing.assert_allclose(np.asarray(chunked._drafts.q), np.asarray(whole._drafts.q), atol=1e-5)


def test_requests_decode_between_the_chunks_of_a_long_prompt():
    model = init_model(TINY, seed=0)
    short = [5, 6, 7, 8, 9]
    ref = full_forward_greedy(model, [short, LONG], 20)[0]
    engine = Engine(model, max_seq_len=T, max_batch=2, speculative=False, prefill_chunk=8)
    a = engine.submit(short, SamplingParams(max_new_tokens=20))
    engine.step()
    b = engine.submit(LONG, SamplingParams(max_new_tokens=20))
    engine.step()  # b's first chunk, and a decode step for a alone (read one step later)
    assert engine.stats()["prefilling"] == 1 and len(a.tokens) == 2 and b.tokens == []
    while engine.stats()["prefilling"]:
        before = len(a.tokens)
        engine.step()
        assert len(a.tokens) == before + 1  # a kept decoding, one token per step
    assert a.result() == ref[0] and b.result() == ref[1]
    # chunk buckets and cache windows compile once: the same request again adds nothing
    size = engine._prefill_fn._cache_size()
    assert engine.generate([LONG], 4) == [ref[1][:4]]
    assert engine._prefill_fn._cache_size() == size


def test_prefix_caching_and_chunked_prefill_give_the_plain_paths_greedy_tokens():
    """The acceptance check: an engine with prefix caching and 8-token prefill chunks against
    one with neither, on shared contexts (lm-eval's pattern; a hit copied from another slot, a
    hit followed by more chunks, a shorter shared prefix) mixed with running streams; the same
    greedy tokens exactly."""
    model = init_model(MTP_CFG, seed=0)
    rng = np.random.default_rng(2)
    context = rng.integers(3, 250, 24).tolist()
    prompts = [[5, 6, 7], context + [9], context + [11, 12], context + rng.integers(3, 250, 8).tolist(),
               rng.integers(3, 250, 12).tolist(), context[:20] + [13]]

    def run(engine):
        first = [engine.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts[:2]]
        engine.step()  # the context's first prompt is prefilling; the others queue meanwhile
        rest = [engine.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts[2:]]
        return [r.result() for r in first + rest]

    plain = Engine(model, max_seq_len=T, max_batch=2, speculative=False, prefill_chunk=None,
                   prefix_cache=False)
    both = Engine(model, max_seq_len=T, max_batch=2, speculative=False, prefill_chunk=8)
    want = run(plain)
    assert run(both) == want
    stats = both.stats()
    assert stats["prefix_cache_hit_tokens"] >= 2 * 23, stats  # the context's later prompts reused it
    assert stats["prefills"] > plain.stats()["prefills"]  # and prompts went in chunks


def test_the_default_prefill_chunk_and_turning_it_off():
    """Chunked prefill is the default (the library's and serve.py's); None / --prefill-chunk 0
    prefill whole prompts."""
    import importlib.util
    from dsv3_jax.serve.buckets import DEFAULT_PREFILL_CHUNK
    spec = importlib.util.spec_from_file_location("serve_cli", ROOT / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    model = init_model(TINY, seed=0)
    assert Engine(model, max_seq_len=T, max_batch=1).prefill_chunk == DEFAULT_PREFILL_CHUNK == 512
    assert Engine(model, max_seq_len=T, max_batch=1, prefill_chunk=None).prefill_chunk is None
    assert serve.parse(["--checkpoint", "x"]).prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert serve.parse(["--checkpoint", "x", "--prefill-chunk", "0"]).prefill_chunk == 0


def test_prefill_chunk_must_be_positive():
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Engine(init_model(TINY, seed=0), max_seq_len=T, max_batch=1, prefill_chunk=0)


@pytest.mark.slow  # CI time: the chunk-window precompile test below covers the same path
def test_precompile_covers_what_serving_calls():
    """After `Engine.precompile()` requests of any length and batch (echo included) compile
    nothing more; idle slots past the busy ones are left out of decode steps."""
    from dsv3_jax import ModelConfig, init_model
    from dsv3_jax.serve.engine import Engine, SamplingParams
    cfg = ModelConfig.from_json(FIXTURES / "v3_mtp").replace(max_position_embeddings=64)
    engine = Engine(init_model(cfg, seed=1), max_seq_len=16, max_batch=2, speculative=False)
    assert engine.precompile() == 2 * 2 + 2  # prefill: length 16 x rows 1, 2 x echo; decode: k 1, 2
    sizes = engine._prefill_fn._cache_size(), engine._decode_fn._cache_size()
    reqs = [engine.submit(list(range(3, 3 + n)), SamplingParams(max_new_tokens=4, prompt_logprobs=e))
            for n, e in [(5, None), (10, 1), (2, None)]]
    assert all(len(r.result()) == 4 for r in reqs)
    assert (engine._prefill_fn._cache_size(), engine._decode_fn._cache_size()) == sizes


def test_precompile_covers_chunks_and_prefix_hits():
    """With chunked prefill and `prefix_hits=True`, a long prompt's later chunks and a prompt
    that reuses another's prefix (copy, penalty history, a windowed prefill) compile nothing
    more either; the count is what dsv3_jax/serve/buckets.py enumerates."""
    from dsv3_jax.serve.buckets import decode_windows, prefill_shapes
    cfg = ModelConfig.from_json(FIXTURES / "v3_mtp").replace(max_position_embeddings=64)
    engine = Engine(init_model(cfg, seed=1), max_seq_len=48, max_batch=2, speculative=False,
                    prefill_chunk=8)
    shapes = prefill_shapes(48, 8, 16)
    assert shapes == [(16, 0), (16, 32), (16, 64)]
    helpers = 1 + 3  # copy_prefix; History.begin for prefixes of 16, 32, 64
    assert engine.precompile(echo=False, prefix_hits=True) == 2 * len(shapes) + 2 * len(decode_windows(48)) + helpers
    fns = (engine._prefill_fn, engine._decode_fn, engine._copy_fn, engine._begin_fn)
    sizes = [f._cache_size() for f in fns]
    context = list(range(3, 33))
    reqs = [engine.submit(context + [40, 41], SamplingParams(max_new_tokens=4, repetition_penalty=1.2))]
    engine.step()
    reqs += [engine.submit(p, SamplingParams(max_new_tokens=4)) for p in (context + [50], list(range(60, 75)))]
    assert all(len(r.result()) == 4 for r in reqs)
    assert engine.stats()["prefix_cache_hit_tokens"] >= 29
    assert [f._cache_size() for f in fns] == sizes
