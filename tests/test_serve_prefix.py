"""Prefix caching (dsv3_jax/serve/prefix_cache.py) against the plain path: the same engine
settings with `prefix_cache=False` as the oracle. lm-eval's pattern (one context, several
continuations, sent together), echo logprobs, a repetition penalty (the prompt's tokens must
count in full) and MTP speculative decoding (the MTP layer's rows are copied too)."""

import numpy as np
import pytest

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.serve.engine import Engine, SamplingParams
from tests.conftest import FIXTURES

CFG = ModelConfig.from_json(FIXTURES / "v3_mtp").replace(max_position_embeddings=256)


@pytest.fixture(scope="module")
def engines():
    model = init_model(CFG, seed=2)
    return [Engine(model, max_seq_len=128, max_batch=2, prefix_cache=c) for c in (True, False)]


def _run(engine, prompts, **kw):
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=4, **kw)) for p in prompts]
    return [(r.result(), r.prompt_logprobs) for r in reqs]


@pytest.mark.slow  # ~60 s of compiles on 2 cores; test_serve_openai's echo test covers hits quickly
def test_shared_contexts_give_the_plain_paths_tokens_and_logprobs(engines):
    cached, plain = engines
    rng = np.random.default_rng(0)
    context = rng.integers(3, CFG.vocab_size, 40).tolist()
    prompts = [context + rng.integers(3, CFG.vocab_size, int(n)).tolist() for n in (1, 3, 5, 2)]
    before = cached.stats()["prefix_cache_hit_tokens"]
    for kw in [{}, {"prompt_logprobs": 1}, {"repetition_penalty": 1.5, "presence_penalty": 0.5}]:
        got, want = _run(cached, prompts, **kw), _run(plain, prompts, **kw)
        assert [g[0] for g in got] == [w[0] for w in want], kw
        if "prompt_logprobs" in kw:
            for (_, g), (_, w) in zip(got, want):
                assert g[0] is None and len(g) == len(w)
                np.testing.assert_allclose([r[0] for r in g[1:]], [r[0] for r in w[1:]], atol=1e-4)
                assert [r[1] for r in g[1:]] == [r[1] for r in w[1:]]
    hits = cached.stats()["prefix_cache_hit_tokens"] - before
    # the first prompt of each round is prefilled in full, the other three reuse 39 positions
    assert hits >= 3 * 3 * 39, hits
    assert plain.stats()["prefix_cache_hit_tokens"] == 0
    # short prefixes are not worth a copy; unrelated prompts are unaffected
    short = [context[:10] + [5, 6], context[:10] + [7]]
    assert [g[0] for g in _run(cached, short)] == [w[0] for w in _run(plain, short)]


def test_prefix_index_picks_the_longest_usable_prefix():
    from dsv3_jax.serve.prefix_cache import PrefixIndex
    index = PrefixIndex(3, min_hit=4)
    ctx = list(range(10, 30))
    index.set(0, ctx[:8])
    index.set(1, ctx + [1, 2], records=(1, [None] + [(0.0, [], [])] * 21))
    prompt = ctx + [7]
    assert index.best(prompt, None) == (1, 19)       # shared positions but the last (MTP reads the next token)
    assert index.best(ctx[:12], None) == (1, 11)     # at least one prompt token is prefilled
    assert index.best(prompt, 2) == (None, 0)        # echo with 2 alternatives: records have 1
    assert index.best(ctx[:8] + [5], None, prefer=(0,)) == (0, 7)  # a tie goes to a free slot
    assert index.best([9] + ctx, None) == (None, 0)
    assert index.wait_for(prompt, 0, [(ctx + [3], None)], None)
    assert not index.wait_for(prompt, 20, [(ctx + [3], None)], None)
    index.clear()
    assert index.best(prompt, None) == (None, 0)
