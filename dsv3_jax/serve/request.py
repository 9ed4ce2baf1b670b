"""A generation request as the engine and its callers see it: parameters and their checks,
tokens, completion."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from dsv3_jax.serve.chat import TextStream

if TYPE_CHECKING:
    from dsv3_jax.serve.engine import Engine


class RequestError(ValueError):
    """A bad prompt or bad sampling parameters (HTTP 400)."""


class QueueFull(RuntimeError):
    """The engine's request queue is at `max_queue` (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. temperature 0 is greedy; top_k / top_p None are off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; need Engine(detokenize=...)
    logprobs: int | None = None         # per generated token: its logprob and the top N (0..MAX_LOGPROBS)
    prompt_logprobs: int | None = None  # per prompt token likewise (the first one's is None)
    presence_penalty: float = 0.0    # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0   # subtracted once per time a token was generated so far
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and generated tokens
    min_tokens: int = 0              # stop tokens are masked until this many tokens exist
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


MAX_LOGPROBS = 20  # the most alternatives a request may ask for (the device programs compute this many)


def validate(prompt, params: SamplingParams, *, vocab_size: int, max_len: int,
             detokenizer: bool) -> list[int]:
    """The prompt as a list of ids, or RequestError naming what is wrong with it or `params`
    (`max_len`: the most positions prompt + new tokens may take)."""
    V = vocab_size
    try:
        prompt = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise RequestError("prompt must be a list of integer token ids") from None
    if not prompt:
        raise RequestError("empty prompt: give at least one token id")
    bad = [t for t in prompt if not 0 <= t < V]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
    p = params
    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be an integer >= 0, got {p.max_new_tokens!r}")
    if p.max_new_tokens == 0 and p.prompt_logprobs is None:
        raise RequestError("max_new_tokens = 0 only makes sense with prompt_logprobs (echo)")
    if len(prompt) + p.max_new_tokens > max_len:
        raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                           f"= {len(prompt) + p.max_new_tokens} exceeds the engine's max_seq_len "
                           f"of {max_len}")
    if not 0 <= p.temperature <= 1e4:  # also refuses NaN
        raise RequestError(f"temperature must be in [0, 1e4], got {p.temperature}")
    if p.top_p is not None and not 0 < p.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k is not None and (not isinstance(p.top_k, int) or not 1 <= p.top_k <= V):
        raise RequestError(f"top_k must be an integer in [1, {V}] (or None: off), got {p.top_k!r}")
    if not isinstance(p.seed, int) or not 0 <= p.seed < 2**63:
        raise RequestError(f"seed must be an integer in [0, 2**63), got {p.seed!r}")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(p, name)
        if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
            raise RequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {v!r}")
    for name, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                         ("repetition_penalty", 0.01, 10)):
        v = getattr(p, name)
        if not isinstance(v, int | float) or not lo <= v <= hi:
            raise RequestError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    if not isinstance(p.min_tokens, int) or not 0 <= p.min_tokens <= p.max_new_tokens:
        raise RequestError(f"min_tokens must be an integer in [0, max_new_tokens], got {p.min_tokens!r}")
    for t, b in p.logit_bias:
        if not (isinstance(t, int) and 0 <= t < V):
            raise RequestError(f"logit_bias token id {t!r} is outside the vocabulary [0, {V})")
        if not isinstance(b, int | float) or not -100 <= b <= 100:
            raise RequestError(f"logit_bias value for token {t} must be in [-100, 100], got {b!r}")
    bad = [t for t in p.stop_token_ids if not (isinstance(t, int) and 0 <= t < V)]
    if bad:
        raise RequestError(f"stop token id {bad[0]!r} is outside the vocabulary [0, {V})")
    if p.stop and not detokenizer:
        raise RequestError("stop strings need a detokenizer: Engine(..., detokenize=fn)")
    if any(not isinstance(s, str) or not s for s in p.stop):
        raise RequestError(f"stop strings must be non-empty strings, got {p.stop!r}")
    return prompt


class Request:
    """One prompt's progress. `tokens` grows as the engine produces them; a stop token, or the
    token that completes a stop string, is kept as the last token."""

    def __init__(self, id: int, prompt: list[int], params: SamplingParams, engine: "Engine"):
        self.id, self.prompt, self.params = id, prompt, params
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._cancelled = False
        self._cond = threading.Condition()
        self._text: TextStream | None = None  # for stop strings
        # per generated token, when params.logprobs is set: (logprob, top ids, top logprobs)
        self.logprobs: list[tuple[float, list[int], list[float]]] = []
        # per prompt token, when params.prompt_logprobs is set (the first is None); set before
        # the first generated token
        self.prompt_logprobs: list[tuple[float, list[int], list[float]] | None] | None = None
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn()` (from the engine's thread) whenever tokens arrive or the request ends:
        how an event loop waits for a request without a thread per request."""
        with self._cond:
            self._listeners.append(fn)
            done = self.done
        if done:
            fn()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # noqa: BLE001 -- a closed event loop must not stop the engine
                pass

    @property
    def done(self) -> bool:
        """Whether the request has finished (for any reason)."""
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating ("cancelled"): a queued request leaves the queue at once, a running
        one frees its slot at the next scheduler step."""
        self._cancelled = True
        self._engine._dequeue(self)

    def stream(self, timeout: float | None = None) -> Iterator[list[int]]:
        """Yield lists of new token ids as they are produced; return when finished.

        Without a running engine thread, waiting drives `engine.step()` itself. `timeout`
        bounds each wait for new tokens (TimeoutError)."""
        sent = 0
        while True:
            self._wait(lambda: len(self.tokens) > sent or self.done, timeout)
            with self._cond:
                new, finished = self.tokens[sent:], self.done
                sent += len(new)
            if new:
                yield new
            if finished:
                return

    def snapshot(self, start: int) -> tuple[list[int], list, bool]:
        """(tokens from index `start` on, their logprob records, whether finished), read together
        so no token produced after the finish check is missed."""
        with self._cond:
            done = self.done
            return self.tokens[start:], self.logprobs[start:], done

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until finished and return the generated tokens (see `finish_reason`, `error`)."""
        self._wait(lambda: self.done, timeout)
        return list(self.tokens)

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> None:
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            with self._cond:
                if ready():
                    return
                if self._engine.running:
                    left = None if deadline is None else deadline - time.perf_counter()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {self.id} not ready within {timeout}s")
                    self._cond.wait(0.1 if left is None else min(left, 0.1))
                    continue
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"request {self.id} not ready within {timeout}s")
            self._engine.step()  # no scheduler thread: drive the engine from here

    def _extend(self, new: list[int], detokenize, logprobs=None) -> tuple[str | None, int]:
        """Append tokens until the first stop condition; returns (finish reason or None, kept).
        `logprobs`: one (logprob, top ids, top logprobs) per token of `new`, if asked for."""
        p, kept, reason = self.params, 0, None
        with self._cond:
            for i, t in enumerate(new):
                self.tokens.append(t)
                if logprobs is not None:
                    self.logprobs.append(logprobs[i])
                kept += 1
                if t in p.stop_token_ids:
                    reason = "stop"
                elif p.stop and self._stop_string_ends(t, detokenize):
                    reason = "stop"
                elif len(self.tokens) >= p.max_new_tokens:
                    reason = "length"
                if reason:
                    break
            if self.first_token_at is None and kept:
                self.first_token_at = time.perf_counter()
            self._cond.notify_all()
        self._notify()
        return reason, kept

    def _stop_string_ends(self, token: int, detokenize) -> bool:
        """Whether the text `token` adds completes a stop string: the HTTP stream's `TextStream`
        (dsv3_jax/serve/chat.py), which decodes a bounded tail of the ids, so each token costs
        the same however long the output is."""
        if self._text is None:
            self._text = TextStream(detokenize, self.params.stop)
        self._text.push([token])
        return self._text.stopped

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
                self.finished_at = time.perf_counter()
            self._cond.notify_all()
        self._notify()
