"""Request parameters of the OpenAI-compatible API: a completion or chat request body checked
field by field and turned into a `Job` (prompt ids, the engine's `SamplingParams`, how to answer).

Every problem is an `APIError` naming the field (`param`), OpenAI-shaped, raised before anything
is queued: every value is range-checked here (top_k against the vocabulary, seeds within
int64, penalties finite and in range, logit_bias ids in the vocabulary, n and the number of
prompts bounded), so nothing a client sends can overflow or fail inside the engine. Unknown
fields are accepted and ignored (logged once per name), as vLLM does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import time
import uuid

from dsv3_jax.serve.chat import FALLBACK, ChatError, check_messages
from dsv3_jax.serve.request import MAX_LOGPROBS, SamplingParams

_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "stop_token_ids",
           "ignore_eos", "logprobs", "top_logprobs", "echo", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias"}
MAX_N = 16         # choices per prompt
MAX_PROMPTS = 256  # prompts per completion request
MAX_STOP_IDS = 64
log = logging.getLogger("dsv3_jax.serve")
_ignored_logged: set[str] = set()


def _ignore(names) -> None:
    """Unknown fields are accepted and ignored, as vLLM does (clients send their own extras:
    `user`, `suffix`, `best_of`, ...); each name is logged once per process."""
    for name in names:
        if name not in _ignored_logged:
            _ignored_logged.add(name)
            log.warning("ignoring request field %r (not used by this server)", name)


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


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"'{name}' must be an integer, got {v!r:.100}")
    if lo is not None and v < lo:
        raise _bad(name, f"'{name}' must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise _bad(name, f"'{name}' must be <= {hi}, got {v}")
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
    """One parsed request: the prompts' ids, the engine's sampling params, and how to answer.

    Choice `i * n + j` continues prompt i with seed `params.seed + j`."""

    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    hidden_ids: tuple[int, ...]
    n: int = 1
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token in the answer (None: no logprobs)
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    def choices(self):
        """(index, prompt ids, SamplingParams) per choice, in index order."""
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                params = self.params if j == 0 else dataclasses.replace(
                    self.params, seed=(self.params.seed + j) % 2**63)
                yield i * self.n + j, prompt, params


class RequestParser:
    """Request bodies to `Job`s, for one engine (its context) and tokenizer (None: ids only)."""

    def __init__(self, *, max_seq_len: int, eos_ids: tuple[int, ...], tokenizer=None,
                 chat_template=None, model_name: str = "model", vocab_size: int | None = None,
                 defaults: SamplingParams = SamplingParams(max_new_tokens=256)):
        self.max_seq_len, self.eos_ids, self.tokenizer = max_seq_len, eos_ids, tokenizer
        self.vocab_size = vocab_size or (tokenizer.get_vocab_size() if tokenizer else 2**31 - 1)
        self.chat_template = chat_template or FALLBACK
        self.model_name = model_name
        self.defaults = defaults  # max_new_tokens, temperature, top_k, top_p when a request omits them

    def _need_tokenizer(self, what: str, param: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and checkpoint {self.model_name!r} has "
                           "none (no tokenizer.json): send 'prompt' as a list of token ids",
                           code="no_tokenizer", param=param)

    def _token_ids(self, v, name: str) -> list[int]:
        """`v` as token ids in the vocabulary, or a 400 naming `name`."""
        ids = _ids(v)
        if ids is None:
            raise _bad(name, f"'{name}' must be a list of token ids, got {json.dumps(v)[:100]}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(name, f"token id {bad[0]} in '{name}' is outside the vocabulary "
                       f"[0, {self.vocab_size})")
        return ids

    def _one_prompt(self, p, name: str) -> list[int]:
        if isinstance(p, str):
            self._need_tokenizer("a text prompt", "prompt")
            ids = self.tokenizer.encode(p).ids
            if not ids:
                raise _bad("prompt", f"'{name}' encodes to no tokens")
            return ids
        if _ids(p) is None:
            raise _bad("prompt", "'prompt' must be a string, a list of strings, a non-empty list "
                       f"of token ids or a list of such lists, got {json.dumps(p)[:100]}")
        return self._token_ids(p, "prompt")

    def _prompts(self, body: dict, chat: bool) -> list[list[int]]:
        if chat:
            self._need_tokenizer("chat", "messages")
            try:
                text = self.chat_template.render(check_messages(body.get("messages")))
            except ChatError as e:
                raise _bad("messages", str(e)) from None
            return [self.tokenizer.encode(text, add_special_tokens=False).ids]
        p = body.get("prompt")
        batch = isinstance(p, list) and bool(p) and all(isinstance(x, str | list) for x in p)
        if not batch:
            return [self._one_prompt(p, "prompt")]
        if len(p) > MAX_PROMPTS:
            raise _bad("prompt", f"'prompt' has {len(p)} prompts; at most {MAX_PROMPTS} per request")
        return [self._one_prompt(x, f"prompt[{i}]") for i, x in enumerate(p)]

    def _logprobs(self, body: dict, chat: bool) -> int | None:
        """Top alternatives per token (None: no logprobs)."""
        if chat:
            if not _bool(body, "logprobs", False):
                if body.get("top_logprobs") is not None:
                    raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
                return None
            return _int(body, "top_logprobs", 0, lo=0, hi=MAX_LOGPROBS)
        if isinstance(body.get("logprobs"), bool):  # chat-style true / false on completions
            return 0 if body["logprobs"] else None
        return _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)

    def _logit_bias(self, body: dict) -> tuple[tuple[int, float], ...]:
        bias = body.get("logit_bias")
        if bias is None:
            return ()
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise _bad("logit_bias", "'logit_bias' must be an object {token id: bias} of at most "
                       f"1024 entries, got {json.dumps(bias)[:100]}")
        out = []
        for k, v in bias.items():
            try:
                t = int(k)
            except ValueError:
                raise _bad("logit_bias", f"'logit_bias' key {k!r:.40} is not a token id") from None
            if not 0 <= t < self.vocab_size:
                raise _bad("logit_bias", f"'logit_bias' token id {t} is outside the vocabulary "
                           f"[0, {self.vocab_size})")
            if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                raise _bad("logit_bias", f"'logit_bias'[{k!r:.40}] must be a number in [-100, 100], "
                           f"got {v!r:.40}")
            out.append((t, float(v)))
        return tuple(out)

    def parse(self, body, chat: bool) -> Job:
        """Validate a request body; raises APIError(400) naming the bad field."""
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        wrong = "prompt" if chat else "messages"
        if wrong in body:
            raise APIError(400, f"unrecognized request argument(s): {wrong} (this endpoint takes "
                           f"'{'messages' if chat else 'prompt'}')", code="unknown_parameter",
                           param=wrong)
        _ignore(sorted(k for k in body if k not in _FIELDS))
        if not isinstance(body.get("model", ""), str):
            raise _bad("model", f"'model' must be a string, got {body['model']!r:.100}")
        n = _int(body, "n", 1, lo=1, hi=MAX_N)
        stream = _bool(body, "stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise _bad("stream_options", "'stream_options' must be {\"include_usage\": bool}")
        echo = not chat and _bool(body, "echo", False)
        logprobs = self._logprobs(body, chat)
        prompts = self._prompts(body, chat)
        if len(prompts) * n > MAX_PROMPTS:
            raise _bad("n", f"{len(prompts)} prompts x n = {n} is more than {MAX_PROMPTS} choices")
        longest = max(map(len, prompts))
        room = self.max_seq_len - longest
        param = "messages" if chat else "prompt"
        if room < 1:
            raise APIError(400, f"the prompt has {longest} tokens; the context is "
                           f"{self.max_seq_len} tokens, so no room is left to generate",
                           code="context_length_exceeded", param=param)
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, name, None, lo=0 if echo else 1)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"'{name}' = {max_tokens} plus the prompt's {longest} tokens "
                           f"exceeds the context of {self.max_seq_len} tokens",
                           code="context_length_exceeded", param=name)
        max_tokens = min(self.defaults.max_new_tokens, room) if max_tokens is None else max_tokens
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise _bad("stop", f"'stop' must be a non-empty string or a list of at most 16, got "
                       f"{json.dumps(body['stop'])[:100]}")
        if stop:
            self._need_tokenizer("'stop' strings", "stop")
        extra = [] if body.get("stop_token_ids") in (None, []) else self._token_ids(
            body["stop_token_ids"], "stop_token_ids")
        if len(extra) > MAX_STOP_IDS:
            raise _bad("stop_token_ids", f"'stop_token_ids' has {len(extra)} ids; at most {MAX_STOP_IDS}")
        stop_ids = tuple(dict.fromkeys(([] if _bool(body, "ignore_eos", False) else list(self.eos_ids)) + extra))
        d = self.defaults
        top_k = _int(body, "top_k", d.top_k, lo=-1, hi=self.vocab_size)  # 0 and -1 (vLLM): no top-k
        top_p = _number(body, "top_p", d.top_p, 0.0, 1.0)
        if top_p == 0.0:
            raise _bad("top_p", "'top_p' must be in (0, 1]")
        seed = _int(body, "seed", None, lo=0, hi=2**63 - 1)
        min_tokens = _int(body, "min_tokens", 0, lo=0, hi=max_tokens)
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", d.temperature, 0.0, 100.0),
            top_k=None if top_k in (0, -1) else top_k, top_p=None if top_p == 1.0 else top_p,
            seed=secrets.randbits(31) if seed is None else seed,
            stop_token_ids=stop_ids, stop=tuple(stop),
            logprobs=logprobs, prompt_logprobs=logprobs if echo and logprobs is not None else None,
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
            min_tokens=min_tokens, logit_bias=self._logit_bias(body))
        return Job(chat, prompts, params, stream, _bool(options, "include_usage", False), stop_ids,
                   n=n, echo=echo, logprobs=logprobs)
