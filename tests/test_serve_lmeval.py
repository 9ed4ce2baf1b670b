"""lm-evaluation-harness against our HTTP server, as a user runs it: lm-eval's `local-completions`
model (its own request code, batch size 8) on two small local tasks defined in
tests/lmeval_task/ (a multiple-choice loglikelihood task and a generate_until task), with the
remote tokenizer backend (/tokenizer_info, /tokenize, /detokenize: no tokenizer files, no
transformers). The server runs in-process with prefix caching and a short prefill chunk, so
lm-eval's continuations of one context reuse its cache rows and longer prompts go in chunks.

The oracle is the model's own forward in JAX: every loglikelihood lm-eval reports equals the
sum of log_softmax(model(ids)) over the continuation tokens (ids tokenized as lm-eval does),
its accuracy equals the accuracy recomputed from those logits, and its generations are the
greedy continuation of the full forward, cut at the stop string.
"""

import json

import jax
import numpy as np
import pytest

from tests.conftest import FIXTURES, ROOT

TASKS = ROOT / "tests" / "lmeval_task"
CONTEXT = 128
EOS = 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(port, model, tokenizer, engine): an in-process server over a random-weight model (the
    v3_mtp fixture's architecture, speculative decoding off: fewer programs to compile) and a
    BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv3_jax import ModelConfig, init_model
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.chat import ChatTemplate
    from dsv3_jax.serve.engine import Engine
    from dsv3_jax.serve.http import Limits, Server
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d.update(vocab_size=512, max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=EOS)
    model = init_model(ModelConfig.from_dict(d), seed=4)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p.read_text() for p in sorted((ROOT / "dsv3_jax" / "serve").glob("*.py"))]
    corpus += [p.read_text() for p in sorted(TASKS.glob("*.jsonl"))] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    engine = Engine(model, max_seq_len=CONTEXT, max_batch=4, prefill_chunk=16, detokenize=tok.decode,
                    speculative=False)
    engine.start()
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", "<|bos|>", "<|eos|>")
    srv = Server(OpenAIAPI(engine, tokenizer=tok, chat_template=template, model_name="tiny"),
                 "127.0.0.1", 0, limits=Limits(drain_seconds=0.2), log=lambda m: None).start()
    yield srv.server_port, model, tok, engine
    srv.shutdown()
    engine.shutdown()


def _forward(model):
    """ids -> fp32 log-softmax of the model's full forward [len, vocab] (one compile)."""
    from flax import nnx
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda st, ids: jax.nn.log_softmax(nnx.merge(gd, st).forward(ids).logits, axis=-1))

    def run(ids):
        buf = np.zeros((1, CONTEXT), np.int32)  # causal: the padding after ids does not matter
        buf[0, :len(ids)] = ids
        return np.asarray(fwd(st, buf), np.float64)[0, :len(ids)]
    return run


def _encode_pair(tok, context: str, continuation: str):
    """lm-eval's causal split (TemplateLM._encode_pair): trailing spaces of the context move to
    the continuation; the continuation's ids are the whole text's past the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@pytest.mark.slow  # CI time: tests/test_serve_openai.py checks the echo logprobs lm-eval reads
def test_lm_eval_local_completions_matches_the_models_logits(served, tmp_path, monkeypatch):
    """The issue's acceptance: lm-eval runs a loglikelihood task and a generate_until task
    against the server with batch size 8; its loglikelihoods equal the log-softmax of
    model(ids) (fp32 tolerance) and its accuracy the accuracy recomputed from them."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # lm-eval downloads nothing
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    lm_eval = pytest.importorskip("lm_eval")
    import yaml
    port, model, tok, engine = served
    tasks = []
    for name, data in [("dsv3_mc", "mc.jsonl"), ("dsv3_gen", "gen.jsonl")]:
        cfg = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
        cfg["dataset_kwargs"]["data_files"]["test"] = str(TASKS / data)
        tasks.append(cfg)
    hits = engine.stats()["prefix_cache_hit_tokens"]
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=tasks, batch_size=8, log_samples=True,
        model_args={"base_url": f"http://127.0.0.1:{port}/v1/completions", "model": "tiny",
                    "tokenizer_backend": "remote", "max_length": CONTEXT, "max_retries": 1,
                    "num_concurrent": 1})
    forward = _forward(model)

    # loglikelihood: every (context, continuation) lm-eval scored, against the forward
    mc = out["samples"]["dsv3_mc"]
    docs = [json.loads(line) for line in (TASKS / "mc.jsonl").read_text().splitlines()]
    assert len(mc) == len(docs)
    correct = []
    for sample in mc:
        doc = sample["doc"]
        lls = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll, is_greedy = resp[0]
            ctx, cont = _encode_pair(tok, context, continuation)
            ids = ctx + cont
            lp = forward(ids)
            want = [lp[j - 1, ids[j]] for j in range(len(ctx), len(ids))]
            assert ll == pytest.approx(sum(want), abs=1e-4), (context, continuation)
            assert is_greedy == all(lp[j - 1].argmax() == ids[j] for j in range(len(ctx), len(ids)))
            lls.append(sum(want))
        assert len(lls) == len(doc["choices"])
        correct.append(float(np.argmax(lls) == doc["answer"]))
    assert out["results"]["dsv3_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    # lm-eval's continuations of one context reused its cache rows
    assert engine.stats()["prefix_cache_hit_tokens"] > hits

    # generate_until: greedy tokens of the full forward, decoded, cut at the first stop string
    gen = out["samples"]["dsv3_gen"]
    assert len(gen) == 4
    matches = []
    for sample in gen:
        context, kwargs = sample["arguments"][0]
        ids = tok.encode(context, add_special_tokens=False).ids
        new = []
        for _ in range(kwargs.get("max_gen_toks", 6)):
            t = int(forward(ids + new)[-1].argmax())
            new.append(t)
            if t == EOS:
                break
        text = tok.decode([t for t in new if t != EOS])
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text, context
        matches.append(float(text.strip() == sample["target"].strip()))
    assert out["results"]["dsv3_gen"]["exact_match,none"] == pytest.approx(np.mean(matches))


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(served):
    """GET /tokenizer_info: the special tokens' strings (lm-eval encodes them through /tokenize
    to find their ids), the chat template, the context."""
    utils = pytest.importorskip("lm_eval.utils")
    port, _, tok, _ = served
    remote = utils.RemoteTokenizer(f"http://127.0.0.1:{port}/v1/completions")
    info = remote.tokenizer_info
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<|bos|>", "<|eos|>", CONTEXT)
    assert (remote.bos_token_id, remote.eos_token_id) == (0, EOS)
    assert remote.encode("def main(") == tok.encode("def main(", add_special_tokens=False).ids
    assert remote.decode(remote.encode("def main(")) == "def main("
    assert "messages" in info["chat_template"]
