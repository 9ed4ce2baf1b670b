"""The OpenAI-compatible HTTP server: starlette routes served by uvicorn.

POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
`"stream": true`, ending `data: [DONE]`), POST /tokenize and /detokenize, GET /v1/models,
/tokenizer_info, /health (503 when the engine cannot step) and /metrics (Prometheus text).
Errors are OpenAI-shaped, `{"error": {"message", "type", "code", "param"}}`: 400, 404, 405,
408 (body slower than `Limits.body_timeout`), 413 (body over `Limits.max_body_bytes`), 429
(engine queue full), 503 (over `Limits.max_concurrency`, or shutting down), 504 (past
`Limits.generation_timeout`), 500. Once an event stream's headers are out, an error is sent as
an `{"error": ...}` event followed by `data: [DONE]`.

Waiting costs no thread: each engine request calls back into the event loop when it has news
(Request.add_listener). A client that disconnects (starlette's disconnect event: the ASGI
receive channel) has its requests cancelled, which frees their engine slots. On SIGTERM the
server stops admitting, lets running requests finish for `Limits.drain_seconds`, then cancels
the rest (their streams end with an error event and `[DONE]`) and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsv3_jax.serve.api import ChoiceStream, OpenAIAPI
from dsv3_jax.serve.api_params import APIError, Job, _bad
from dsv3_jax.serve.metrics import Metrics

__all__ = ["Limits", "OpenAIAPI", "Server", "make_app", "serve_http"]

GET = ("/health", "/v1/models", "/metrics", "/tokenizer_info")
POST = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may take from the server."""

    max_body_bytes: int = 16 * 2**20
    max_concurrency: int = 512          # requests being answered at once (then 503)
    generation_timeout: float = 600.0   # seconds a request may generate (then 504 / error event)
    keep_alive_timeout: float = 30.0    # seconds an idle keep-alive connection stays open
    body_timeout: float = 30.0          # seconds a client may take to send its request body (408)
    drain_seconds: float = 30.0         # on SIGTERM: how long running requests may finish


class _Waker:
    """Wakes one handler's coroutine from the engine thread (no thread per request)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def __call__(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop has closed
            pass

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass
        self.event.clear()


def _error(e: APIError, **headers) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class App:
    """The routes over one `OpenAIAPI`; `draining` (set on SIGTERM) stops admission."""

    def __init__(self, api: OpenAIAPI, limits: Limits = Limits()):
        self.api, self.limits = api, limits
        self.metrics = Metrics(api.engine)
        self.draining = False
        self.drain_deadline = float("inf")
        self.active = 0  # requests being answered
        self.starlette = Starlette(routes=[Route(
            "/{path:path}", self.route, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])])

    def drain(self) -> None:
        """Stop admitting; requests still running after `drain_seconds` are cancelled."""
        self.draining = True
        self.drain_deadline = time.monotonic() + self.limits.drain_seconds

    async def route(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        method = request.method
        response = await self._route(request, path, method)
        self.metrics.request(path if path in GET + POST else "other", response.status_code)
        return response

    async def _route(self, request: Request, path: str, method: str) -> Response:
        try:
            if path not in GET + POST:
                raise APIError(404, f"no route {path!r}: try {', '.join(GET + POST)}", code="not_found")
            if method not in (("GET", "HEAD") if path in GET else ("POST",)):
                e = APIError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
                return _error(e, Allow="GET" if path in GET else "POST")
            if path == "/health":
                healthy = self.api.engine.healthy and not self.draining
                return JSONResponse({"status": "ok" if healthy else "unhealthy",
                                     "model": self.api.model_name, "engine": self.api.engine.stats(),
                                     "draining": self.draining}, status_code=200 if healthy else 503)
            if path == "/v1/models":
                return JSONResponse(self.api.models())
            if path == "/tokenizer_info":
                return JSONResponse(self.api.tokenizer_info())
            if path == "/metrics":
                body, content_type = self.metrics.render()
                return Response(body, media_type=content_type)
            try:
                body = await asyncio.wait_for(self._body(request), self.limits.body_timeout)
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within "
                               f"{self.limits.body_timeout}s", code="timeout") from None
            if path == "/tokenize":
                return JSONResponse(self._tokenize(body))
            if path == "/detokenize":
                return JSONResponse(self._detokenize(body))
            if self.draining:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self.active >= self.limits.max_concurrency:
                raise APIError(503, f"the server is answering {self.active} requests, its limit; "
                               "retry later", type="server_error", code="overloaded")
            job = self.api.parse(body, chat=path.endswith("chat/completions"))
            return await self._complete(request, job, path)
        except APIError as e:
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 -- one bad request must not take the server down
            return _error(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                   type="server_error", code="internal_error"))

    async def _body(self, request: Request):
        """The JSON body, refused above `max_body_bytes` (by Content-Length, or as it arrives)."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                raise APIError(400, f"invalid Content-Length {length!r:.40}")
            if n > limit:
                raise APIError(413, f"the request body ({n} bytes) exceeds {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes")
        if not data:
            raise APIError(400, "a JSON request body is required", code="invalid_json")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _tokenize(self, body) -> dict:
        """{"prompt": str} or {"messages": [...]} -> {"tokens", "count", "max_model_len"}."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        chat = "messages" in body
        self.api.parser._need_tokenizer("tokenize", "messages" if chat else "prompt")
        if not chat and not isinstance(body.get("prompt"), str):
            raise _bad("prompt", "'prompt' must be a string")
        ids = self.api.parser._prompts(body, chat)[0] if chat else self.api.tokenizer.encode(
            body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True))).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.api.engine.max_seq_len}

    def _detokenize(self, body) -> dict:
        """{"tokens": [ids]} -> {"prompt": text}."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.api.parser._need_tokenizer("detokenize", "tokens")
        return {"prompt": self.api.decode(self.api.parser._token_ids(body.get("tokens"), "tokens"))}

    # -- completions ---------------------------------------------------------------------------

    async def _complete(self, request: Request, job: Job, path: str) -> Response:
        choices = self.api.submit(job)
        self.metrics.submitted(sum(len(c.prompt) for c in choices))
        if job.stream:
            return StreamingResponse(self._stream(request, job, choices, path), headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.active += 1
        try:
            results = {c.index: (c, "", [], []) for c in choices}
            async for c, ids, text, lps in self._updates(choices, request.is_disconnected):
                _, t, i, l = results[c.index]
                results[c.index] = (c, t + text, i + ids, l + lps)
            error = next((c for c in choices if c.reason in ("error", "timeout", "shutdown")), None)
            if error is not None:
                raise self._failure(error)
            return JSONResponse(self.api.response(job, list(results.values())))
        finally:
            self.active -= 1
            self._cancel(choices)

    def _failure(self, c: ChoiceStream) -> APIError:
        if c.reason == "timeout":
            return APIError(504, f"generation took longer than {self.limits.generation_timeout}s",
                            type="server_error", code="timeout")
        if c.reason == "shutdown":
            return APIError(503, "the server shut down before the request finished",
                            type="server_error", code="shutting_down")
        return APIError(500, f"the engine failed on this request: {c.request.error}",
                        type="server_error", code="engine_error")

    def _cancel(self, choices: list[ChoiceStream]) -> None:
        for c in choices:
            if not c.request.done:
                c.request.cancel()
            if not c.observed:
                c.observed = True
                self.metrics.finished(c.request)

    async def _updates(self, choices: list[ChoiceStream], disconnected=None):
        """(choice, new ids, new text, logprob records) as the engine produces them, a last one
        per choice when it ends (`choice.done`); past the generation timeout, or the drain
        deadline on shutdown, the rest are cancelled with reason "timeout" / "shutdown".
        `disconnected`: starlette's `Request.is_disconnected` (ClientDisconnect when true)."""
        waker = _Waker()
        for c in choices:
            c.request.add_listener(waker)
        deadline = time.monotonic() + self.limits.generation_timeout
        pending = list(choices)
        while pending:
            for c in list(pending):
                ids, text, lps = c.take()
                if ids or text or c.done:
                    yield c, ids, text, lps
                if c.done:
                    pending.remove(c)
            if not pending:
                return
            now = time.monotonic()
            late = "timeout" if now > deadline else "shutdown" if now > self.drain_deadline else None
            if late:
                for c in pending:
                    c.request.cancel()
                    c.done, c.reason = True, late
                    yield c, [], "", []
                return
            await waker.wait(0.5)
            if disconnected is not None and await disconnected():
                raise ClientDisconnect()

    async def _stream(self, request: Request, job: Job, choices: list[ChoiceStream], path: str):
        """The event stream. A chat choice's role chunk goes out with its first token (so a
        client's time to first token is the engine's). Cancelled by starlette when the client
        disconnects: the finally cancels the engine requests."""
        self.active += 1
        try:
            try:
                async for event in self._events(job, choices):
                    yield event
            except Exception as e:  # noqa: BLE001 -- the headers are out: an error event, not a 500
                yield _event(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                      type="server_error", code="internal_error").body())
            yield b"data: [DONE]\n\n"
        finally:
            self.active -= 1
            self._cancel(choices)

    async def _events(self, job: Job, choices: list[ChoiceStream]):
        """The stream's events before `[DONE]`."""
        offsets = {c.index: 0 for c in choices}
        async for c, ids, text, lps in self._updates(choices):
            if not c.started:
                c.started = True
                if job.chat:
                    yield _event(self.api.chunk(job, c, None, [], [], role=True))
                echo_text, echo_ids, echo_lps = self.api.echo(job, c)
                if echo_ids:
                    yield _event(self.api.chunk(job, c, echo_text, echo_ids, list(echo_lps)))
                    offsets[c.index] = len(echo_text)
            if ids or text:
                yield _event(self.api.chunk(job, c, text, ids, lps, offset=offsets[c.index]))
                offsets[c.index] += len(text)
            if c.done:
                if c.reason in ("error", "timeout", "shutdown"):
                    yield _event(self._failure(c).body())
                else:
                    yield _event(self.api.chunk(job, c, None, [], [], finish=c.reason))
        if job.include_usage:
            yield _event({**self.api.head(job, True), "choices": [],
                          "usage": self.api.usage(job, choices)})


def make_app(api: OpenAIAPI, limits: Limits = Limits()) -> App:
    """The ASGI application (`App.starlette`) answering for `api`."""
    return App(api, limits)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the app to drain on SIGTERM / SIGINT and saying where it listens."""

    def __init__(self, config: uvicorn.Config, app: App, log):
        super().__init__(config)
        self.app, self.log, self.port = app, log, None
        self.started_event = threading.Event()

    def handle_exit(self, sig, frame) -> None:
        self.app.drain()
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            cfg = self.config
            self.log(f"serving {self.app.api.model_name!r} on http://{cfg.host}:{self.port} "
                     f"(POST {', '.join(POST)}; GET {', '.join(GET)})")
        self.started_event.set()


class Server:
    """`serve_forever()` here, or `start()` in a thread (tests) and `shutdown()`."""

    def __init__(self, api: OpenAIAPI, host: str = "127.0.0.1", port: int = 8000,
                 limits: Limits = Limits(), log=print):
        self.app = make_app(api, limits)
        config = uvicorn.Config(
            self.app.starlette, host=host, port=port, log_level="warning", access_log=False,
            limit_concurrency=limits.max_concurrency + 64,  # our 503 first; uvicorn's is the backstop
            timeout_keep_alive=int(limits.keep_alive_timeout),
            timeout_graceful_shutdown=int(limits.drain_seconds) + 5, lifespan="off")
        self._server = _Uvicorn(config, self.app, log)
        self._thread: threading.Thread | None = None

    @property
    def server_port(self) -> int | None:
        return self._server.port

    def serve_forever(self) -> None:
        """Serve until SIGINT / SIGTERM (main thread), or until `shutdown()`."""
        self._server.run()

    def start(self) -> "Server":
        """Serve from a background thread; returns once listening."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="http")
        self._thread.start()
        self._server.started_event.wait(60)
        return self

    def shutdown(self) -> None:
        self.app.drain()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(60)


def serve_http(api: OpenAIAPI, host: str = "127.0.0.1", port: int = 8000, log=print,
               limits: Limits = Limits()) -> None:
    """Serve until SIGINT / SIGTERM (then drain, see the module docstring)."""
    Server(api, host, port, limits, log).serve_forever()
