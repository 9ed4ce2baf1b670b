"""The OpenAI surface evaluation harnesses and load generators use, against independent oracles,
on an in-process server (uvicorn in a thread) over one module-scoped engine:

- echoed prompt logprobs (lm-eval's loglikelihood request: a batch of id prompts, `echo`,
  `logprobs: 1`, `max_tokens` 0 / 1) equal the fp32 log-softmax of the model's own forward;
- generated-token logprobs and sampling under penalties follow the penalty formulas (a NumPy
  re-implementation over the model's forward logits);
- n > 1 gives the samples of seeds seed + i; lists of prompts answer in index order;
- isolation: hostile requests during 16 concurrent streams, and an injected failure inside one
  request's prefill, fail only themselves; the others finish with the tokens of a quiet run;
- the HTTP stack: body limits, /health, /metrics, draining on SIGTERM.

The official `openai` client, lm-eval and vLLM's benchmark requests: tests/test_serve_clients.py
and tests/test_serve_lmeval.py (a server with a tokenizer).
"""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import jax
import numpy as np
import pytest

from tests.conftest import FIXTURES

CONTEXT = 128
EOS = 1


@pytest.fixture(scope="module")
def model():
    from dsv3_jax import ModelConfig, init_model
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d.update(vocab_size=512, max_position_embeddings=CONTEXT, eos_token_id=EOS)
    return init_model(ModelConfig.from_dict(d), seed=3)


@pytest.fixture(scope="module")
def server(model):
    """(Server, Engine): max_batch 4, speculative (the model has MTP), fp32."""
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.engine import Engine
    from dsv3_jax.serve.http import Limits, Server
    engine = Engine(model, max_seq_len=CONTEXT, max_batch=4)
    engine.start()
    srv = Server(OpenAIAPI(engine, model_name="tiny"), "127.0.0.1", 0,
                 limits=Limits(max_body_bytes=4096, drain_seconds=0.2), log=lambda m: None).start()
    yield srv, engine
    srv.shutdown()
    engine.shutdown()


@pytest.fixture(scope="module")
def forward(model):
    """fp32 logits of the model's own full forward over one id sequence: [len, vocab]."""
    from flax import nnx
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda st, ids: nnx.merge(gd, st).forward(ids).logits)

    def run(ids):
        buf = np.zeros((1, 32), np.int32)  # one compile: causal, so the tail does not matter
        buf[0, :len(ids)] = ids
        return np.asarray(fwd(st, buf), np.float64)[0, :len(ids)]
    return run


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def request(port, method, path, body=None, raw=None, headers=None):
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    try:
        return r.status, json.loads(payload) if payload else None
    except json.JSONDecodeError:
        return r.status, payload.decode()


def post(port, path, body):
    return request(port, "POST", path, body)


def stream(port, path, body):
    """Parsed `data:` events of a streaming request (the last is "[DONE]")."""
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = []
    for line in r:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    conn.close()
    return events


def streamed_ids(events, index=0):
    assert events[-1] == "[DONE]"
    return [t for e in events[:-1] if "choices" in e for c in e["choices"] if c["index"] == index
            for t in c["token_ids"]]


def test_echo_prompt_logprobs_are_the_models_log_softmax(server, forward):
    """lm-eval local-completions' loglikelihood request, read as lm-eval reads it."""
    srv, engine = server
    context = list(range(100, 120))  # lm-eval: continuations of one context (prefix cache hits)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
               context + [7], context + [8, 9], context + [10, 11, 12]]
    hits = engine.stats()["prefix_cache_hit_tokens"]
    status, out = post(srv.server_port, "/v1/completions",
                       {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1,
                        "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3, 4]
    for p, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        ref = _log_softmax(forward(p))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [ref[j - 1, p[j]] for j in range(1, len(p))]
        np.testing.assert_allclose(lp["token_logprobs"][1:len(p)], want, rtol=0, atol=2e-5)
        for j in range(1, len(p)):  # the top alternative is the argmax, as lm-eval's is_greedy reads it
            assert max(lp["top_logprobs"][j].values()) == pytest.approx(ref[j - 1].max(), abs=2e-5)
        # the generated token (greedy: the argmax after the prompt) and its logprob
        gen = choice["token_ids"]
        assert gen == [int(ref[-1].argmax())]
        assert lp["token_logprobs"][-1] == pytest.approx(ref[-1].max(), abs=2e-5)
        assert len(lp["tokens"]) == len(lp["text_offset"]) == len(p) + 1
        # lm-eval: sum(token_logprobs[ctxlen:-1]) over the continuation
        ctxlen = 2
        assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(sum(want[ctxlen - 1:]), abs=1e-4)
    assert engine.stats()["prefix_cache_hit_tokens"] - hits >= 2 * 19
    # max_tokens 0: the prompt's logprobs only
    status, out = post(srv.server_port, "/v1/completions",
                       {"prompt": prompts[0], "echo": True, "logprobs": 0, "max_tokens": 0})
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["token_ids"] == [] and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(prompts[0])
    assert out["usage"]["completion_tokens"] == 0


def _penalized(logits, prompt, generated, *, presence, frequency, repetition, bias):
    """The penalty formulas (dsv3_jax/serve/penalties.py docstring, vLLM's order) in NumPy."""
    x = logits.copy()
    for t, b in bias.items():
        x[t] += b
    counts = np.bincount(np.asarray(generated, int), minlength=x.shape[-1]) if generated else np.zeros_like(x)
    seen = (counts > 0) | np.isin(np.arange(x.shape[-1]), prompt)
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)
    return x - frequency * counts - presence * (counts > 0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_penalties_and_logprobs_follow_the_formulas(server, forward, temperature):
    srv, _ = server
    prompt = [5, 6, 7, 8, 9]
    ref0 = forward(prompt)[-1]
    bias = {int(ref0.argmax()): -5.0, 77: 2.0}  # the raw argmax is pushed down, 77 up
    pen = dict(presence=0.8, frequency=0.5, repetition=1.3, bias=bias)
    body = {"prompt": prompt, "max_tokens": 6, "temperature": temperature, "seed": 7, "logprobs": 3,
            "presence_penalty": pen["presence"], "frequency_penalty": pen["frequency"],
            "repetition_penalty": pen["repetition"], "logit_bias": {str(k): v for k, v in bias.items()},
            "ignore_eos": True}
    status, out = post(srv.server_port, "/v1/completions", body)
    assert status == 200, out
    choice = out["choices"][0]
    ids, lp = choice["token_ids"], choice["logprobs"]
    assert len(ids) == 6
    for t in range(len(ids)):
        x = _penalized(forward(prompt + ids[:t])[-1], prompt, ids[:t], **pen)
        ref = _log_softmax(x / (temperature or 1.0))
        if temperature == 0:
            assert ids[t] == int(x.argmax()), t  # greedy on the penalized logits
        assert lp["token_logprobs"][t] == pytest.approx(ref[ids[t]], abs=1e-4), t
        top = sorted(lp["top_logprobs"][t].values(), reverse=True)[:3]
        np.testing.assert_allclose(top, np.sort(ref)[::-1][:3], atol=1e-4)
    # the same request streamed: the same tokens and logprobs
    events = stream(srv.server_port, "/v1/completions", body)
    assert streamed_ids(events) == ids
    got = [v for e in events[:-1] if e["choices"] and e["choices"][0]["logprobs"]
           for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    np.testing.assert_allclose(got, lp["token_logprobs"], atol=1e-6)


def test_min_tokens_and_n_samples(server, forward):
    srv, _ = server
    port = srv.server_port
    prompt = [11, 12, 13]
    g = int(forward(prompt)[-1].argmax())
    # the greedy first token is a stop token: without min_tokens the answer is just it
    status, out = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "stop_token_ids": [g]})
    assert out["choices"][0]["token_ids"] == [g] and out["choices"][0]["finish_reason"] == "stop"
    status, out = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "stop_token_ids": [g],
                                                 "min_tokens": 3, "ignore_eos": True})
    ids = out["choices"][0]["token_ids"]
    assert status == 200 and len(ids) >= 3 and g not in ids[:3], ids
    # n = 3: the samples of seeds 100, 101, 102
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 1.0, "ignore_eos": True}
    status, out = post(port, "/v1/completions", {**body, "n": 3, "seed": 100})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for i, c in enumerate(out["choices"]):
        single = post(port, "/v1/completions", {**body, "seed": 100 + i})[1]
        assert c["token_ids"] == single["choices"][0]["token_ids"]
    assert len({tuple(c["token_ids"]) for c in out["choices"]}) > 1
    events = stream(port, "/v1/completions", {**body, "n": 3, "seed": 100})
    assert [streamed_ids(events, i) for i in range(3)] == [c["token_ids"] for c in out["choices"]]


def test_hostile_requests_during_16_streams_fail_only_themselves(server, model, monkeypatch):
    """Each case of the issue while 16 greedy streams run, plus a failure injected into one
    request's prefill: the streams all finish with the tokens of a quiet run, and the engine's
    cache is intact afterwards."""
    srv, engine = server
    port = srv.server_port
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 512, size=int(rng.integers(2, 12))).tolist() for _ in range(16)]
    body = lambda p: {"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}  # noqa: E731
    quiet = [post(port, "/v1/completions", body(p))[1]["choices"][0]["token_ids"] for p in prompts[:4]]

    original = engine._prefill_group

    def flaky(s, window, group):  # a failure inside the prefill of prompts starting with 499
        if any(engine._slots[slot].prompt[0] == 499 for slot, _, _ in group):
            raise RuntimeError("injected prefill failure")
        return original(s, window, group)
    monkeypatch.setattr(engine, "_prefill_group", flaky)
    hostile = [
        ({"prompt": [1], "top_k": 2147483648}, 400), ({"prompt": [1], "seed": 2**64}, 400),
        ({"prompt": [1], "logit_bias": {"100000": 5}}, 400), ({"prompt": [1], "logit_bias": {"-1": 5}}, 400),
        ({"prompt": [1], "n": 10**6}, 400), ({"prompt": [1], "max_tokens": 2**63}, 400),
        ({"prompt": [1], "presence_penalty": float("inf")}, 400), ({"prompt": [1], "top_p": -1}, 400),
        ({"prompt": [1], "temperature": float("nan")}, 400), ({"prompt": [[]]}, 400),
        ({"prompt": [499, 5, 6], "max_tokens": 4}, 500),
    ]
    with ThreadPoolExecutor(24) as pool:
        streams = [pool.submit(stream, port, "/v1/completions", body(p)) for p in prompts]
        bad = [pool.submit(request, port, "POST", "/v1/completions", None,
                           json.dumps(b, allow_nan=True).encode()) for b, _ in hostile]
        raw_cases = [(b"{}", {"Content-Length": "-5"}, 400), (b"{}", {"Content-Length": str(10**12)}, 413),
                     (b"{not json", None, 400), (b"[1, 2]", None, 400), (b"\xff\xfe", None, 400)]
        raw = [pool.submit(request, port, "POST", "/v1/completions", None, b, h) for b, h, _ in raw_cases]
        for f, (b, want) in zip(bad, hostile):
            status, out = f.result()
            assert status == want, (b, out)
            if want == 500:
                assert "injected prefill failure" in out["error"]["message"]
        assert [f.result()[0] for f in raw] == [want for _, _, want in raw_cases]
        results = [streamed_ids(f.result()) for f in streams]
    assert results[:4] == quiet
    assert all(len(r) == 8 for r in results)
    monkeypatch.setattr(engine, "_prefill_group", original)
    assert [post(port, "/v1/completions", body(p))[1]["choices"][0]["token_ids"] for p in prompts[:4]] == quiet
    assert request(port, "GET", "/health")[0] == 200


def test_health_metrics_and_limits(server):
    srv, engine = server
    port = srv.server_port
    status, out = request(port, "POST", "/v1/completions", None, b"x" * 5000)
    assert status == 413 and "exceeds 4096 bytes" in out["error"]["message"]
    # chunked bodies are counted as they arrive
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n")
        assert b" 413 " in sock.recv(4096).split(b"\r\n")[0] + b" "
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    for name in ("dsv3_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
                 "dsv3_queue_depth", "dsv3_running_slots", "dsv3_prompt_tokens_total",
                 "dsv3_generated_tokens_total", "dsv3_time_to_first_token_seconds_bucket",
                 "dsv3_time_per_output_token_seconds_bucket", "dsv3_speculative_acceptance_rate"):
        assert name in text, name
    engine._failures = 3  # as after three failed scheduler steps in a row
    try:
        status, out = request(port, "GET", "/health")
        assert status == 503 and out["status"] == "unhealthy"
    finally:
        engine._failures = 0
    assert request(port, "GET", "/health")[0] == 200


def test_client_disconnect_cancels_a_nonstreaming_request(server):
    srv, engine = server
    before = engine.stats()["requests_finished"]
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", srv.server_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 30
        while engine.stats()["active"] == 0 and time.time() < deadline:
            time.sleep(0.01)
    deadline = time.time() + 30
    while engine.stats()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats()["active"] == 0
    assert engine.stats()["requests_finished"] == before  # cancelled, not run to its end


def test_sigterm_drains_then_ends_streams_with_done(model):
    """uvicorn's SIGTERM handler (handle_exit): new requests are refused, a stream still running
    after the drain time ends with an error event and [DONE], and the server exits."""
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.engine import Engine
    from dsv3_jax.serve.http import Limits, Server
    engine = Engine(model, max_seq_len=CONTEXT, max_batch=2)
    engine.start()
    srv = Server(OpenAIAPI(engine), "127.0.0.1", 0, limits=Limits(drain_seconds=0.3),
                 log=lambda m: None).start()
    port = srv.server_port
    try:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": [5, 6], "max_tokens": 120, "ignore_eos": True, "stream": True}))
        r = conn.getresponse()
        first = r.readline()
        assert first.startswith(b"data: ")
        srv._server.handle_exit(15, None)
        assert srv.app.draining
        rest = r.read().decode()
        events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "shut down" in json.loads(events[-2])["error"]["message"]
        srv._thread.join(30)
        assert not srv._thread.is_alive()
    finally:
        srv.shutdown()
        engine.shutdown()


def test_a_slow_body_times_out(model):
    """A client that stops sending its body mid-way gets a 408, not a handler held forever."""
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.engine import Engine
    from dsv3_jax.serve.http import Limits, Server
    engine = Engine(model, max_seq_len=CONTEXT, max_batch=1)
    srv = Server(OpenAIAPI(engine), "127.0.0.1", 0, limits=Limits(body_timeout=0.3),
                 log=lambda m: None).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            assert b" 408 " in sock.recv(4096).split(b"\r\n")[0] + b" "
    finally:
        srv.shutdown()
