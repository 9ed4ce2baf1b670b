"""serve.py and the OpenAI-compatible HTTP API: real server processes, real HTTP clients.

The checkpoints are made here: the v3_mtp fixture architecture (MTP, so speculative decoding
runs) with random weights saved as a HF folder, plus a byte-level BPE tokenizer and a jinja
chat template; a copy without tokenizer files serves token ids only. Greedy outputs are
checked against `demo.greedy_generate` (full forward per token, no cache) as the oracle.
Server processes share a persistent XLA compilation cache so only the first one compiles.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import numpy as np
import pytest

from tests.conftest import FIXTURES, ROOT

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
CONTEXT = 128
ORACLE_LEN = 20  # prompt + generated tokens in every oracle call: one compile
EOS = 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Two HF folders with the same random weights: `tiny` (tokenizer, chat template), `bare`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv3_jax import ModelConfig, init_model, save_hf
    root = tmp_path_factory.mktemp("serve")
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d.update(vocab_size=512, max_position_embeddings=CONTEXT, eos_token_id=EOS)
    model = init_model(ModelConfig.from_dict(d), seed=3)
    save_hf(model, root / "tiny")
    shutil.copytree(root / "tiny", root / "bare")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [p.read_text() for p in sorted((ROOT / "dsv3_jax").rglob("*.py"))],
        trainers.BpeTrainer(vocab_size=512, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(root / "tiny" / "tokenizer.json"))
    (root / "tiny" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}))
    return types.SimpleNamespace(root=root, tiny=root / "tiny", bare=root / "bare", model=model,
                                 tokenizer=tok, env=dict(
                                     os.environ, JAX_PLATFORMS="cpu",
                                     JAX_COMPILATION_CACHE_DIR=str(root / "xla-cache"),
                                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"))


class ServerProcess:
    """`serve.py --port 0 ...` in a subprocess; the port is read from its log line."""

    def __init__(self, args: list[str], env: dict):
        # --no-precompile: every bucket up front is minutes of compiles on CI's 2 cores
        # (tests/test_serve_prefill.py checks precompile on a short context)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), *args, "--port", "0",
                                      "--no-precompile"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.log: list[str] = []
        self.port = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            if " on http://" in line and self.port is None:
                self.port = int(line.split(" on http://", 1)[1].split()[0].rsplit(":", 1)[1])
                self.ready.set()
        self.ready.set()

    def wait(self, timeout: float = 300) -> "ServerProcess":
        self.ready.wait(timeout)
        assert self.port, "server did not start:\n" + "".join(self.log[-30:])
        assert get(self.port, "/health")[0] == 200
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _request(port, method, path, body=None, raw=None):
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, json.loads(payload) if payload else None


def get(port, path):
    return _request(port, "GET", path)


def post(port, path, body=None, raw=None):
    return _request(port, "POST", path, body, raw)


def stream(port, path, body):
    """The parsed `data:` events of a streaming request (the last one is "[DONE]")."""
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events = []
    for line in r:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    conn.close()
    return events


def joined(events, chat=False):
    """(text, token_ids, finish_reason) of a streamed completion."""
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1] if e.get("choices")]
    text = "".join((c["delta"].get("content") or "") if chat else c["text"] for c in choices)
    return text, [t for c in choices for t in c["token_ids"]], choices[-1]["finish_reason"]


def oracle(model, prompt, n):
    """Greedy tokens by full recomputation, cut after the first EOS."""
    from dsv3_jax.demo import greedy_generate
    out = greedy_generate(model, prompt, n)
    return out[:out.index(EOS) + 1] if EOS in out else out


@pytest.fixture(scope="module")
def server(ckpt):
    s = ServerProcess(["--checkpoint", str(ckpt.tiny), "--dtype", "fp32", "--max-batch", "2",
                       "--max-new-tokens", "12"], ckpt.env).wait()
    yield s
    # after everything the tests threw at it, the server is still up
    assert s.proc.poll() is None and get(s.port, "/health")[0] == 200
    s.stop()


def test_concurrent_streams_match_nonstreaming_and_the_oracle(server, ckpt):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, size=int(rng.integers(2, 15))).tolist() for _ in range(32)]
    prompts[:2] = [rng.integers(3, 512, size=8).tolist() for _ in range(2)]
    body = lambda p: {"prompt": p, "max_tokens": 12, "temperature": 0}  # noqa: E731
    with ThreadPoolExecutor(32) as pool:
        plain = list(pool.map(lambda p: post(server.port, "/v1/completions", body(p)), prompts))
        streamed = list(pool.map(lambda p: stream(server.port, "/v1/completions", body(p)), prompts))
    for p, (status, out), events in zip(prompts, plain, streamed):
        assert status == 200, out
        choice = out["choices"][0]
        assert joined(events) == (choice["text"], choice["token_ids"], choice["finish_reason"])
        assert out["usage"] == {"prompt_tokens": len(p), "completion_tokens": len(choice["token_ids"]),
                                "total_tokens": len(p) + len(choice["token_ids"])}
        ids = choice["token_ids"]
        assert choice["finish_reason"] == ("stop" if ids[-1] == EOS else "length")
        assert choice["text"] == ckpt.tokenizer.decode([t for t in ids if t != EOS])
    for p, (_, out) in zip(prompts[:2], plain):
        assert out["choices"][0]["token_ids"] == oracle(ckpt.model, p, ORACLE_LEN - 8)


def test_text_prompt_stop_strings_and_chat(server, ckpt):
    status, out = post(server.port, "/v1/completions", {"prompt": "def main(", "max_tokens": 12})
    assert status == 200
    full = out["choices"][0]["text"]
    # a stop string from the middle of the greedy text: the output ends just before it
    start = next(i for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    cut = full[:full.index(stop)]
    req = {"prompt": "def main(", "max_tokens": 12, "stop": [stop, "never-seen"]}
    status, out = post(server.port, "/v1/completions", req)
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (cut, "stop")
    text, ids, reason = joined(stream(server.port, "/v1/completions", req))
    assert (text, ids, reason) == (cut, out["choices"][0]["token_ids"], "stop")
    assert stop in ckpt.tokenizer.decode(ids) and stop not in ckpt.tokenizer.decode(ids[:-1])

    messages = [{"role": "user", "content": "hi"}]
    prompt = ckpt.tokenizer.encode("<|bos|>user: hi\nassistant:", add_special_tokens=False).ids
    n = ORACLE_LEN - len(prompt)
    status, out = post(server.port, "/v1/chat/completions", {"messages": messages, "max_tokens": n})
    assert status == 200 and out["object"] == "chat.completion", out
    assert prompt[0] == 0 and out["usage"]["prompt_tokens"] == len(prompt)
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["token_ids"] == oracle(ckpt.model, prompt, n)
    events = stream(server.port, "/v1/chat/completions",
                    {"messages": messages, "max_tokens": n, "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["usage"] == out["usage"]
    assert joined(events, chat=True) == (choice["message"]["content"], choice["token_ids"],
                                         choice["finish_reason"])
    # chat logprobs: the `logprobs.content` form, one entry per generated token
    status, out = post(server.port, "/v1/chat/completions", {"messages": messages, "max_tokens": 4,
                                                             "logprobs": True, "top_logprobs": 2})
    content = out["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == len(out["choices"][0]["token_ids"])
    for entry, t in zip(content, out["choices"][0]["token_ids"]):
        assert entry["token"] == ckpt.tokenizer.decode([t]) and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2 and entry["bytes"] == list(entry["token"].encode())
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)  # greedy
    # /tokenize and /detokenize
    status, out = post(server.port, "/tokenize", {"prompt": "def main("})
    assert status == 200 and out["tokens"] == ckpt.tokenizer.encode("def main(").ids
    assert post(server.port, "/detokenize", {"tokens": out["tokens"]})[1]["prompt"] == "def main("
    status, out = post(server.port, "/tokenize", {"messages": messages})
    assert out["tokens"] == prompt
    status, models = get(server.port, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"


BAD = [  # (method, path, body or raw bytes, status, words in the message)
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("POST", "/v1/completions", {"prompt": [1, 2, 512]}, 400, "token id 512 in 'prompt' is outside"),
    ("POST", "/v1/completions", {"prompt": [-1]}, 400, "token id -1 in 'prompt' is outside"),
    ("POST", "/v1/completions", {"prompt": [5] * CONTEXT}, 400, "no room is left"),
    ("POST", "/v1/completions", {"prompt": [5] * 100, "max_tokens": 40}, 400, "exceeds the context"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "must be an integer"),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 0}, 400, "'n' must be >= 1"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 17}, 400, "'n' must be <= 16"),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "'stop' must be"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "'logprobs' must be <= 20"),
    ("POST", "/v1/completions", {"prompt": [1], "top_k": 2147483648}, 400, "'top_k' must be <= 512"),
    ("POST", "/v1/completions", {"prompt": [1], "seed": 2**64}, 400, "'seed' must be <="),
    ("POST", "/v1/completions", {"prompt": [1], "seed": -1}, 400, "'seed' must be >= 0"),
    ("POST", "/v1/completions", {"prompt": [1], "logit_bias": {"512": 1}}, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": [1], "logit_bias": {"5": 1e9}}, 400, "[-100, 100]"),
    ("POST", "/v1/completions", {"prompt": [1], "presence_penalty": 3}, 400, "'presence_penalty' must be in"),
    ("POST", "/v1/completions", {"prompt": [1], "repetition_penalty": 0}, 400, "'repetition_penalty' must be in"),
    ("POST", "/v1/completions", {"prompt": [1], "min_tokens": 99, "max_tokens": 4}, 400, "'min_tokens' must be <="),
    ("POST", "/v1/completions", {"prompt": [1], "stop_token_ids": [600]}, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": [[1], [2, 700]]}, 400, "token id 700"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "needs 'logprobs': true"),
    ("POST", "/v1/completions", {"messages": []}, 400, "unrecognized request argument(s): messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be"),
    ("GET", "/v1/completions", None, 405, "GET is not allowed"),
    ("POST", "/health", {}, 405, "POST is not allowed"),
    ("DELETE", "/v1/models", None, 405, "DELETE is not allowed"),
    ("GET", "/v2/engines", None, 404, "no route"),
    ("POST", "/tokenize", {"prompt": 5}, 400, "'prompt' must be a string"),
    ("POST", "/detokenize", {"tokens": [1, 9999]}, 400, "outside the vocabulary"),
]


def test_malformed_requests_get_openai_errors(server):
    for method, path, body, status, words in BAD:
        raw = body if isinstance(body, bytes) else None
        got, out = _request(server.port, method, path, None if raw else body, raw)
        assert got == status, (method, path, body, out)
        err = out["error"]
        assert words in err["message"] and err["type"] and "code" in err, (body, err)


def test_client_disconnect_cancels_and_server_keeps_serving(server):
    before = get(server.port, "/health")[1]["engine"]
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 120, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 2:
            got += sock.recv(4096)
    deadline = time.time() + 30
    while time.time() < deadline:
        after = get(server.port, "/health")[1]["engine"]
        if after["active"] == 0 and after["queued"] == 0:
            break
        time.sleep(0.05)
    assert after["active"] == 0 and after["queued"] == 0
    # cancelled, not run to its 120 tokens (a finished request would count here)
    assert after["requests_finished"] == before["requests_finished"]
    assert after["tokens_generated"] - before["tokens_generated"] < 120
    status, out = post(server.port, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3})
    assert status == 200 and len(out["choices"][0]["token_ids"]) <= 3


def test_tokenizerless_checkpoint_and_the_cli(server, ckpt):
    """The bare folder serves token ids (same weights: same tokens) and refuses text; serve.py
    --prompt / --prompt-ids stream the same greedy tokens to stdout."""
    cli = [sys.executable, str(ROOT / "serve.py"), "--dtype", "fp32", "--max-new-tokens", "10",
           "--max-batch", "2"]  # the servers' shapes: compiled programs come from the cache
    runs = [subprocess.Popen(cli + ["--checkpoint", str(ckpt.tiny), "--prompt", "def main("],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ckpt.env),
            subprocess.Popen(cli + ["--checkpoint", str(ckpt.bare), "--prompt-ids", "5,6,7"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ckpt.env)]
    bare = ServerProcess(["--checkpoint", str(ckpt.bare), "--dtype", "fp32", "--max-batch", "2"],
                         ckpt.env)
    try:
        bare.wait()
        ref = post(server.port, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 10})[1]
        status, out = post(bare.port, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 10})
        assert status == 200 and out["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        assert out["choices"][0]["text"] == ""
        for path, body in [("/v1/completions", {"prompt": "hello"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": [5], "stop": "x"})]:
            status, out = post(bare.port, path, body)
            assert status == 400 and out["error"]["code"] == "no_tokenizer", out
            assert "no tokenizer" in out["error"]["message"]
    finally:
        bare.stop()
    text_ref = post(server.port, "/v1/completions", {"prompt": "def main(", "max_tokens": 10})[1]
    outs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == text_ref["choices"][0]["text"] + "\n"
    assert outs[1][0] == ",".join(map(str, ref["choices"][0]["token_ids"])) + "\n"
    assert "tokens in" in outs[0][1]


def test_queue_full_and_engine_failures_in_process(ckpt, monkeypatch):
    """429 on a full queue, 500 when the engine fails (at submit or mid-request), then still up."""
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.engine import Engine, SamplingParams
    from dsv3_jax.serve.http import Server
    engine = Engine(ckpt.model, max_seq_len=CONTEXT, max_batch=1, max_queue=1)
    server = Server(OpenAIAPI(engine, model_name="in-process"), "127.0.0.1", 0).start()
    port = server.server_port
    try:
        engine.submit([5, 6], SamplingParams(max_new_tokens=2))  # fills the queue: not started
        status, out = post(port, "/v1/completions", {"prompt": [5, 6, 7]})
        assert status == 429 and out["error"]["type"] == "rate_limit_error", out

        def boom(*a, **k):
            raise RuntimeError("device on fire")
        with monkeypatch.context() as m:
            m.setattr(engine, "submit", boom)
            status, out = post(port, "/v1/completions", {"prompt": [5, 6, 7]})
            assert status == 500 and "device on fire" in out["error"]["message"], out
        monkeypatch.setattr(engine, "_prefill", boom)  # fails the request inside the engine
        engine.start()
        deadline = time.time() + 60  # the queued request leaves the queue (max_queue=1) first
        while engine.stats()["queued"] and time.time() < deadline:
            time.sleep(0.01)
        status, out = post(port, "/v1/completions", {"prompt": [5, 6, 7]})
        assert status == 500 and "device on fire" in out["error"]["message"], out
        events = stream(port, "/v1/completions", {"prompt": [5, 6, 7]})
        assert "device on fire" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        # three scheduler steps failed in a row: unhealthy until one succeeds
        assert get(port, "/health")[0] == 503
        monkeypatch.undo()
        assert post(port, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2})[0] == 200
        assert get(port, "/health")[0] == 200
        assert post(port, "/v1/completions", {"prompt": "text"})[0] == 400  # no tokenizer here
    finally:
        server.shutdown()
        engine.shutdown()
