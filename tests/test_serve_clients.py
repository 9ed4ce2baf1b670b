"""Real clients against the in-process server of tests/test_serve_lmeval.py (a tokenizer, prefix
caching, 16-token prefill chunks): vLLM's benchmark_serving request, its exact JSON bodies for
the completions and chat backends sent and parsed as its client does (benchmarks/
backend_request_func.py in vLLM: aiohttp, line by line, `data: ` stripped, [DONE], the usage
chunk), and the official `openai` client (completions, chat, streaming, logprobs, echo, n)."""

import asyncio
import json
import os
import time

import pytest

from tests.test_serve_lmeval import served  # noqa: F401 -- the module's server fixture

PROMPT = "Question: Which layer of DeepSeek-V3 routes each token to a few experts? Answer:"


async def _vllm_request(url: str, payload: dict) -> dict:
    """vLLM's async_request_openai_completions / _chat_completions, reduced to what it measures:
    success, the generated text, time to first token, inter-token latencies, output tokens."""
    import aiohttp
    out = {"success": False, "text": "", "ttft": 0.0, "itl": [], "output_tokens": None, "done": False}
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY')}"}
    chat = url.endswith("chat/completions")
    async with aiohttp.ClientSession(trust_env=True, timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = last = time.perf_counter()
        async with session.post(url=url, json=payload, headers=headers) as response:
            assert response.status == 200, await response.text()
            async for chunk_bytes in response.content:
                chunk_bytes = chunk_bytes.strip()
                if not chunk_bytes:
                    continue
                chunk = chunk_bytes.decode("utf-8").removeprefix("data: ")
                if chunk == "[DONE]":
                    out["done"] = True
                    continue
                data = json.loads(chunk)
                now = time.perf_counter()
                if choices := data.get("choices"):
                    text = choices[0]["delta"].get("content") if chat else choices[0].get("text")
                    if not out["ttft"]:
                        out["ttft"] = now - start
                    else:
                        out["itl"].append(now - last)
                    last = now
                    out["text"] += text or ""
                if usage := data.get("usage"):
                    out["output_tokens"] = usage.get("completion_tokens")
            out["success"] = out["ttft"] > 0
    return out


def test_vllm_benchmark_serving_requests(served):  # noqa: F811
    """The bodies vLLM's benchmark client sends (`repetition_penalty: 1.0`, `logprobs: null`,
    `ignore_eos`, `stream_options.include_usage`; chat: content parts and
    `max_completion_tokens`), 4 at once as its load generator does: every request succeeds, its
    usage chunk counts the tokens, and the text is the non-streaming answer's."""
    port = served[0]
    base = f"http://127.0.0.1:{port}/v1"
    completion = {"model": "tiny", "prompt": PROMPT, "temperature": 0.0, "repetition_penalty": 1.0,
                  "max_tokens": 8, "logprobs": None, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
            "temperature": 0.0, "max_completion_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}

    async def run():
        return await asyncio.gather(*[_vllm_request(f"{base}/completions", completion) for _ in range(2)],
                                    *[_vllm_request(f"{base}/chat/completions", chat) for _ in range(2)])
    results = asyncio.run(run())
    for r in results:
        assert r["success"] and r["done"] and r["output_tokens"] == 8, r
        assert len(r["itl"]) >= 1
    import requests
    plain = requests.post(f"{base}/completions", json={**completion, "stream": False}, timeout=120).json()
    assert results[0]["text"] == results[1]["text"] == plain["choices"][0]["text"]
    plain_chat = requests.post(f"{base}/chat/completions", json={**chat, "stream": False}, timeout=120).json()
    assert results[2]["text"] == results[3]["text"] == plain_chat["choices"][0]["message"]["content"]
    assert plain_chat["usage"]["completion_tokens"] == 8


def test_the_official_openai_client(served):  # noqa: F811
    """The `openai` package: completions with logprobs, echo and n over batched id prompts, text
    streaming, chat with logprobs and n, chat streaming with the usage chunk, and its error type
    for a 400."""
    openai = pytest.importorskip("openai")
    port = served[0]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    out = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2,
                                    logprobs=2, echo=True, temperature=0.5, seed=3,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == 3 + 3
    assert len(lp.top_logprobs[1]) >= 2 and out.usage.completion_tokens == 12
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    events = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == text.choices[0].text
    assert events[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=2,
                                          logprobs=True, top_logprobs=2, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5) for e in content)  # greedy
    assert chat.choices[0].message.content == chat.choices[1].message.content
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        chat.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(model="tiny", prompt=[1], extra_body={"top_k": 2**31})
