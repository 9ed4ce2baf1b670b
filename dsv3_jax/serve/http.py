"""An OpenAI-compatible HTTP API over the engine, standard library only.

POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
`"stream": true`, ending `data: [DONE]`), GET /v1/models and /health. Every choice also
carries `token_ids`: every id the model generated, a final EOS / stop token included.
Errors are OpenAI-shaped, `{"error": {"message", "type", "code", "param"}}`, with status 400
(bad request), 404, 405, 413, 429 (engine queue full) or 500 (engine failure). A client that
disconnects has its request cancelled, which frees its engine slot. Request bodies are checked
and turned into engine requests in dsv3_jax/serve/api_params.py.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dsv3_jax.serve.api_params import APIError, Job, RequestParser
from dsv3_jax.serve.chat import TextStream, finish_reason, stream_text
from dsv3_jax.serve.engine import QueueFull, RequestError, SamplingParams

MAX_BODY_BYTES = 16 * 2**20


class OpenAIAPI:
    """Request bodies to engine requests and engine output to OpenAI response objects."""

    def __init__(self, engine, *, tokenizer=None, chat_template=None, model_name: str = "model",
                 defaults: SamplingParams = SamplingParams(max_new_tokens=256)):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        eos = engine.cfg.eos_token_id
        self.parser = RequestParser(
            max_seq_len=engine.max_seq_len, tokenizer=tokenizer, chat_template=chat_template,
            model_name=model_name, defaults=defaults,
            eos_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def parse(self, body, chat: bool) -> Job:
        """Validate a request body (dsv3_jax/serve/api_params.py); raises APIError(400)."""
        return self.parser.parse(body, chat)

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
