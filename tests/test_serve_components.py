"""The serving pieces under the HTTP layer, without a server: incremental text with stop
strings (chat.TextStream, detokenize.IncrementalText), chat templates and message checks,
checkpoint loading for serving (a train.py run folder, bad paths), and request-body parsing
(api_params.RequestParser). The checkpoint and tokenizer are tests/test_serve_http.py's."""

import os
import shutil

import numpy as np
import pytest

from tests.test_serve_http import EOS, ckpt  # noqa: F401 -- the module's checkpoint fixture


def test_text_stream_holds_back_split_characters_and_stop_prefixes(ckpt):  # noqa: F811
    from dsv3_jax.serve.chat import TextStream
    tok = ckpt.tokenizer
    ids = tok.encode("naïve café → done").ids
    full = tok.decode(ids)
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # split characters
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return tok.decode(ids)

    text = TextStream(decode, hidden_ids=[EOS])
    pieces = [text.push([t]) for t in ids + [EOS]] + [text.finish()]
    assert "".join(pieces) == full and not any("\ufffd" in p for p in pieces)
    assert max(lengths) <= 8 < len(ids)  # a bounded tail decoded per push, not the whole text
    # the incremental pieces of a long random output are its full decode
    from dsv3_jax.serve.detokenize import IncrementalText
    rand = np.random.default_rng(0).integers(0, tok.get_vocab_size(), 300).tolist()
    inc = IncrementalText(tok.decode)
    assert "".join([inc.push([t]) for t in rand] + [inc.finish()]) == tok.decode(rand)
    for stop in ["café", "é →", "done", "e", "not there"]:
        text = TextStream(tok.decode, [stop, "zzz"])
        pieces = [text.push([t]) for t in ids] + [text.finish()]
        assert "".join(pieces) == (full[:full.index(stop)] if stop in full else full), stop
        assert text.stopped == (stop in full)


def test_chat_templates_and_message_checks():
    from dsv3_jax.serve.chat import FALLBACK, ChatError, ChatTemplate, check_messages
    messages = check_messages([{"role": "system", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                            {"type": "text", "text": "there"}]}])
    assert FALLBACK.render(messages) == "<|system|>\nbe brief\n<|user|>\nhi there\n<|assistant|>\n"
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                          "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}", bos_token="<s>")
    assert strict.render(messages[1:]) == "<s>hi there"
    with pytest.raises(ChatError, match="user first"):
        strict.render(messages)
    for bad, words in [([], "non-empty list"), ([{"role": "user"}], "content must be"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], "text part")]:
        with pytest.raises(ChatError, match=words):
            check_messages(bad)


def test_load_for_serving_run_folder_and_bad_paths(ckpt, tmp_path):  # noqa: F811
    """A train.py-style run folder (orbax model + optimizer state) loads its latest step, cast to
    bf16; folders that are neither kind fail naming the path."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dsv3_jax.checkpoint import Checkpointer
    from dsv3_jax.serve.loading import LoadError, load_for_serving
    run = tmp_path / "run"
    ckpt_dir = Checkpointer(run / "checkpoints", async_save=False)
    optimizer = nnx.Optimizer(ckpt.model, optax.adamw(1e-3), wrt=nnx.Param)
    ckpt_dir.save(7, ckpt.model, optimizer, {"step": 7})
    ckpt_dir.close()
    shutil.copy(ckpt.tiny / "config.json", run / "config.json")
    shutil.copy(ckpt.tiny / "tokenizer.json", run / "tokenizer.json")
    model, tok, template, name = load_for_serving(run, dtype="bf16")
    assert (name, template, tok.get_vocab_size()) == ("run", None, 512)
    want = jax.tree.leaves(nnx.state(ckpt.model, nnx.Param))
    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(g.dtype == jnp.bfloat16 for g in got)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w.astype(jnp.bfloat16)))
    _, tok, template, _ = load_for_serving(ckpt.tiny, dtype="fp32")
    assert template.bos_token == "<|bos|>" and template.eos_token == "<|eos|>"
    (tmp_path / "empty").mkdir()
    (tmp_path / "configonly").mkdir()
    shutil.copy(ckpt.tiny / "config.json", tmp_path / "configonly" / "config.json")
    for path, words in [(tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "has no config.json"),
                        (tmp_path / "configonly", "neither a checkpoints/ folder")]:
        with pytest.raises(LoadError, match=words) as e:
            load_for_serving(path)
        assert str(path) in str(e.value)
    with pytest.raises(LoadError, match="precision 'fp16'"):
        load_for_serving(ckpt.tiny, dtype="fp16")


def test_request_parameters_parse_without_an_engine():
    """Request-body validation is its own module (serve/api_params.py): no engine, no server."""
    from dsv3_jax.serve.api_params import APIError, RequestParser

    p = RequestParser(max_seq_len=32, eos_ids=(EOS,))
    job = p.parse({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.5, "top_k": -1,
                   "stop_token_ids": [9], "seed": 3}, chat=False)
    assert job.prompt == [5, 6, 7] and job.params.max_new_tokens == 4
    assert job.params.top_k is None and job.params.stop_token_ids == (EOS, 9) and job.params.seed == 3
    assert p.parse({"prompt": [5]}, chat=False).params.max_new_tokens == 31  # the room left
    # fields this server does not use are accepted and ignored, as vLLM does
    assert p.parse({"prompt": [5], "bogus": 1, "user": "u", "best_of": 1}, chat=False).prompt == [5]
    job = p.parse({"prompt": [[5], [6, 7]], "n": 2, "seed": 10}, chat=False)
    assert [(i, pr, sp.seed) for i, pr, sp in job.choices()] == [
        (0, [5], 10), (1, [5], 11), (2, [6, 7], 10), (3, [6, 7], 11)]
    for body, param in [({"prompt": "text"}, "prompt"), ({"prompt": [1], "max_tokens": 40}, "max_tokens"),
                        ({"prompt": [1], "top_p": 0}, "top_p"), ({"prompt": [1], "logprobs": 21}, "logprobs"),
                        ({"prompt": [1], "n": 99}, "n"), ({"messages": []}, "messages")]:
        with pytest.raises(APIError) as e:
            p.parse(body, chat="messages" in body)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.body())


def test_compilation_cache_keeps_even_quick_compiles(tmp_path):
    """serve.py's --compilation-cache: every program, however quick to compile, is written to
    the cache, so a restarted server loads its buckets instead of compiling them again. In a
    child process: JAX initialises its persistent cache once per process and keeps it, so turned
    on here it would serialise every later test's executables into it."""
    import subprocess
    import sys
    code = ("import jax, jax.numpy as jnp, sys\n"
            "from dsv3_jax.serve.loading import use_compilation_cache\n"
            "use_compilation_cache(sys.argv[1])\n"
            "jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], check=True, timeout=120,
                   env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert any((tmp_path / "xla").iterdir())
