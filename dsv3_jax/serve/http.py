"""An OpenAI-compatible HTTP API over the engine, standard library only.

POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
`"stream": true`, ending `data: [DONE]`), GET /v1/models and /health. Every choice also
carries `token_ids`: every id the model generated, a final EOS / stop token included.
Errors are OpenAI-shaped, `{"error": {"message", "type", "code", "param"}}`, with status 400
(bad request), 404, 405, 413, 429 (engine queue full) or 500 (engine failure). A client that
disconnects has its request cancelled, which frees its engine slot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dsv3_jax.serve.chat import FALLBACK, ChatError, TextStream, check_messages, finish_reason, stream_text
from dsv3_jax.serve.engine import QueueFull, RequestError, SamplingParams

MAX_BODY_BYTES = 16 * 2**20
_COMMON = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "user",
           "stop_token_ids", "ignore_eos"}
# Accepted when they ask for the default behaviour; anything else is a 400.
_DEFAULT_ONLY = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                 "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                 "logit_bias": (None, {}), "suffix": (None,), "best_of": (None, 1),
                 "tools": (None, []), "tool_choice": (None, "none"),
                 "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


def _int(body: dict, name: str, default, lo: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"'{name}' must be an integer, got {v!r:.100}")
    if lo is not None and v < lo:
        raise _bad(name, f"'{name}' must be >= {lo}, got {v}")
    return v


def _number(body: dict, name: str, default, lo: float, hi: float = math.inf):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a number, got {v!r:.100}")
    if not lo <= v <= hi:
        raise _bad(name, f"'{name}' must be in [{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be true or false, got {v!r:.100}")
    return v


def _ids(v) -> list[int] | None:
    """`v` as token ids if it is a list of integers, else None."""
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return list(v)
    return None


@dataclasses.dataclass
class Job:
    """One parsed request: the prompt ids, the engine's sampling params, and how to answer."""

    chat: bool
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    hidden_ids: tuple[int, ...]
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class OpenAIAPI:
    """Request bodies to engine requests and engine output to OpenAI response objects."""

    def __init__(self, engine, *, tokenizer=None, chat_template=None, model_name: str = "model",
                 defaults: SamplingParams = SamplingParams(max_new_tokens=256)):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template = chat_template or FALLBACK
        self.defaults = defaults  # max_new_tokens, temperature, top_k, top_p when a request omits them
        eos = engine.cfg.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _need_tokenizer(self, what: str, param: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and checkpoint {self.model_name!r} has "
                           "none (no tokenizer.json): send 'prompt' as a list of token ids",
                           code="no_tokenizer", param=param)

    def _prompt(self, body: dict, chat: bool) -> list[int]:
        if chat:
            self._need_tokenizer("chat", "messages")
            try:
                text = self.chat_template.render(check_messages(body.get("messages")))
            except ChatError as e:
                raise _bad("messages", str(e)) from None
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            self._need_tokenizer("a text prompt", "prompt")
            ids = self.tokenizer.encode(p).ids
            if not ids:
                raise _bad("prompt", "'prompt' encodes to no tokens")
            return ids
        ids = _ids(p)
        if ids is None:
            raise _bad("prompt", "'prompt' must be a string or a non-empty list of token ids (one "
                       f"prompt per request), got {json.dumps(p)[:100]}")
        return ids

    def parse(self, body, chat: bool) -> Job:
        """Validate a request body; raises APIError(400) naming the bad field."""
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        wrong = "prompt" if chat else "messages"
        unknown = sorted(k for k in body if k == wrong or k not in _COMMON and k not in _DEFAULT_ONLY)
        if unknown:
            raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}",
                           code="unknown_parameter", param=unknown[0])
        for name, allowed in _DEFAULT_ONLY.items():
            if name in body and body[name] not in allowed:
                raise _bad(name, f"'{name}' = {json.dumps(body[name])[:100]} is not supported "
                           f"(allowed: {', '.join(json.dumps(a) for a in allowed)})")
        if not isinstance(body.get("model", ""), str):
            raise _bad("model", f"'model' must be a string, got {body['model']!r:.100}")
        if _int(body, "n", 1, lo=1) != 1:
            raise _bad("n", f"'n' = {body['n']} is not supported: only n=1")
        stream = _bool(body, "stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "'stream_options' must be {\"include_usage\": bool}")
        prompt = self._prompt(body, chat)
        room = self.engine.max_seq_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context is "
                           f"{self.engine.max_seq_len} tokens, so no room is left to generate",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, name, None, lo=1)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"'{name}' = {max_tokens} plus the prompt's {len(prompt)} tokens "
                           f"exceeds the context of {self.engine.max_seq_len} tokens",
                           code="context_length_exceeded", param=name)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise _bad("stop", f"'stop' must be a non-empty string or a list of at most 16, got "
                       f"{json.dumps(body['stop'])[:100]}")
        if stop:
            self._need_tokenizer("'stop' strings", "stop")
        extra = body.get("stop_token_ids") or []
        if _ids(extra) is None and extra != []:
            raise _bad("stop_token_ids", "'stop_token_ids' must be a list of token ids")
        stop_ids = tuple(dict.fromkeys(([] if _bool(body, "ignore_eos", False) else list(self.eos_ids)) + extra))
        d = self.defaults
        top_k = _int(body, "top_k", d.top_k, lo=-1)  # 0 and -1 (vLLM) mean no top-k
        top_p = _number(body, "top_p", d.top_p, 0.0, 1.0)
        if top_p == 0.0:
            raise _bad("top_p", "'top_p' must be in (0, 1]")
        seed = _int(body, "seed", None, lo=0)
        params = SamplingParams(
            max_new_tokens=max_tokens or min(d.max_new_tokens, room),
            temperature=_number(body, "temperature", d.temperature, 0.0),
            top_k=None if top_k in (0, -1) else top_k, top_p=None if top_p == 1.0 else top_p,
            seed=secrets.randbits(31) if seed is None else seed,
            stop_token_ids=stop_ids, stop=tuple(stop))
        return Job(chat, prompt, params, stream, _bool(options, "include_usage", False), stop_ids)

    def submit(self, job: Job):
        """The engine Request for `job`; engine refusals become 400 / 429 / 500."""
        try:
            return self.engine.submit(job.prompt, job.params)
        except RequestError as e:
            raise APIError(400, str(e), code="invalid_request") from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           code="queue_full") from None
        except Exception as e:  # noqa: BLE001 -- the server outlives any engine failure
            raise APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error",
                           code="engine_error") from None

    def text_stream(self, job: Job) -> TextStream:
        return TextStream(self.decode if self.tokenizer else None, job.params.stop, job.hidden_ids)

    def _head(self, job: Job, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
        return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind,
                "created": job.created, "model": self.model_name}

    def usage(self, job: Job, n: int) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": n,
                "total_tokens": len(job.prompt) + n}

    def response(self, job: Job, text: str, ids: list[int], finish: str | None) -> dict:
        """The non-streaming response object."""
        choice = {"index": 0, "token_ids": ids, "logprobs": None, "finish_reason": finish}
        if job.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(job, False), "choices": [choice], "usage": self.usage(job, len(ids))}

    def chunk(self, job: Job, text: str | None, ids: list[int], finish: str | None = None,
              role: bool = False) -> dict:
        """One streamed event's object."""
        choice = {"index": 0, "token_ids": ids, "logprobs": None, "finish_reason": finish}
        if job.chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if role else
                               {} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        return {**self._head(job, True), "choices": [choice]}

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "dsv3-jax", "max_model_len": self.engine.max_seq_len}]}


def _watch(sock: socket.socket, request) -> None:
    """Cancel `request` when the client closes its connection before the request finishes."""
    def run():
        while request.finish_reason is None:
            try:
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    break  # EOF: the client hung up
            except (OSError, ValueError):
                break
            if readable:
                return  # the client sent more bytes: still there
        else:
            return
        request.cancel()
    threading.Thread(target=run, daemon=True, name="disconnect-watch").start()


class Handler(BaseHTTPRequestHandler):
    """Routes: GET /health, /v1/models; POST /v1/completions, /v1/chat/completions."""

    server_version = "dsv3-jax"
    protocol_version = "HTTP/1.1"  # keep-alive for JSON responses; event streams close
    GET = ("/health", "/v1/models")
    POST = ("/v1/completions", "/v1/chat/completions")

    @property
    def api(self) -> OpenAIAPI:
        return self.server.api

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "GET" if self._path() in self.GET else "POST")
        if status >= 400:  # an unread request body must not be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _route(self) -> None:
        method = self.command
        try:
            path = self._path()
            if path not in self.GET + self.POST:
                raise APIError(404, f"no route {path!r}: try {', '.join(self.GET + self.POST)}",
                               code="not_found")
            if path not in {"GET": self.GET, "POST": self.POST}.get(method, ()):
                raise APIError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
            if path == "/health":
                self._json(200, {"status": "ok", "model": self.api.model_name,
                                 "engine": self.api.engine.stats()})
            elif path == "/v1/models":
                self._json(200, self.api.models())
            else:
                self._complete(self.api.parse(self._body(), chat=path.endswith("chat/completions")))
        except APIError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 -- one bad request must not take the server down
            self._json(500, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                     type="server_error", code="internal_error").body())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _route

    def _body(self):
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(400, "a request body with a Content-Length header is required") from None
        if n > MAX_BODY_BYTES:
            raise APIError(413, f"the request body ({n} bytes) exceeds {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _complete(self, job: Job) -> None:
        request = self.api.submit(job)
        _watch(self.connection, request)
        text = self.api.text_stream(job)
        if not job.stream:
            pieces, ids = [], []
            for new_ids, new_text in stream_text(request, text):
                ids += new_ids
                pieces.append(new_text)
            reason = finish_reason(request, text)
            if reason == "error":
                raise APIError(500, f"the engine failed on this request: {request.error}",
                               type="server_error", code="engine_error")
            self._json(200, self.api.response(job, "".join(pieces), ids, reason))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if job.chat:
                self._event(self.api.chunk(job, None, [], role=True))
            n = 0
            for new_ids, new_text in stream_text(request, text):
                n += len(new_ids)
                self._event(self.api.chunk(job, new_text, new_ids))
            reason = finish_reason(request, text)
            if reason == "error":
                self._event(APIError(500, f"the engine failed on this request: {request.error}",
                                     type="server_error", code="engine_error").body())
            else:
                self._event(self.api.chunk(job, None, [], finish=reason))
                if job.include_usage:
                    self._event({**self.api._head(job, True), "choices": [],
                                 "usage": self.api.usage(job, n)})
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client went away mid-stream: free its slot
            request.cancel()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")


class Server(ThreadingHTTPServer):
    """A thread per connection; `api` answers the requests."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, api: OpenAIAPI, host: str = "127.0.0.1", port: int = 8000):
        self.api = api
        super().__init__((host, port), Handler)


def serve_http(api: OpenAIAPI, host: str = "127.0.0.1", port: int = 8000, log=print) -> None:
    """Serve until SIGINT / SIGTERM."""
    server = Server(api, host, port)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log(f"serving {api.model_name!r} on http://{host}:{server.server_port} "
        "(POST /v1/completions, /v1/chat/completions; GET /v1/models, /health)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
