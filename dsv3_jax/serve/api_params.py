"""Request parameters of the OpenAI-compatible API: a completion or chat request body checked
field by field and turned into a `Job` (prompt ids, the engine's `SamplingParams`, how to answer).

Every problem is an `APIError` naming the field (`param`), OpenAI-shaped; unknown fields are
refused, and fields that only have a default behaviour here (`logprobs`, `echo`, penalties, ...)
are accepted only with that default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import uuid

from dsv3_jax.serve.chat import FALLBACK, ChatError, check_messages
from dsv3_jax.serve.request import SamplingParams

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


class RequestParser:
    """Request bodies to `Job`s, for one engine (its context) and tokenizer (None: ids only)."""

    def __init__(self, *, max_seq_len: int, eos_ids: tuple[int, ...], tokenizer=None,
                 chat_template=None, model_name: str = "model",
                 defaults: SamplingParams = SamplingParams(max_new_tokens=256)):
        self.max_seq_len, self.eos_ids, self.tokenizer = max_seq_len, eos_ids, tokenizer
        self.chat_template = chat_template or FALLBACK
        self.model_name = model_name
        self.defaults = defaults  # max_new_tokens, temperature, top_k, top_p when a request omits them

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
        room = self.max_seq_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context is "
                           f"{self.max_seq_len} tokens, so no room is left to generate",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, name, None, lo=1)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"'{name}' = {max_tokens} plus the prompt's {len(prompt)} tokens "
                           f"exceeds the context of {self.max_seq_len} tokens",
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
