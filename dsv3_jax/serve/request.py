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
    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {p.max_new_tokens!r}")
    if len(prompt) + p.max_new_tokens > max_len:
        raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                           f"= {len(prompt) + p.max_new_tokens} exceeds the engine's max_seq_len "
                           f"of {max_len}")
    if not p.temperature >= 0:
        raise RequestError(f"temperature must be >= 0, got {p.temperature}")
    if p.top_p is not None and not 0 < p.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k is not None and (not isinstance(p.top_k, int) or p.top_k < 1):
        raise RequestError(f"top_k must be an integer >= 1, got {p.top_k!r}")
    if not isinstance(p.seed, int):
        raise RequestError(f"seed must be an integer, got {p.seed!r}")
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

    def _extend(self, new: list[int], detokenize) -> tuple[str | None, int]:
        """Append tokens until the first stop condition; returns (finish reason or None, kept)."""
        p, kept, reason = self.params, 0, None
        with self._cond:
            for t in new:
                self.tokens.append(t)
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
