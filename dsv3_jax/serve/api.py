"""The OpenAI response schema over the engine: a parsed `Job` in, engine requests submitted, and
their output shaped as completion / chat-completion objects, streamed chunks, logprobs.

No HTTP here (dsv3_jax/serve/http.py routes and streams); request bodies are checked in
dsv3_jax/serve/api_params.py. Every choice also carries `token_ids`: every id the model
generated, a final EOS / stop token included.

Logprobs (`logprobs` on completions, `logprobs` + `top_logprobs` on chat) are those of the
distribution each token was drawn from, in fp32: the model's logits after temperature (greedy
rows: the raw logits), before top-k / top-p truncation (which would make most of them -inf).
Echoed prompt tokens carry the raw model's log-softmax; the first prompt token's is null.
"""

from __future__ import annotations

import time

from dsv3_jax.serve.api_params import APIError, Job, RequestParser
from dsv3_jax.serve.chat import TextStream, finish_reason
from dsv3_jax.serve.request import QueueFull, Request, RequestError, SamplingParams

LOWEST_LOGPROB = -9999.0  # JSON has no -inf


def _lp(x: float) -> float:
    return max(float(x), LOWEST_LOGPROB)


class ChoiceStream:
    """One choice's progress: its engine request's new tokens turned into text and logprobs."""

    def __init__(self, index: int, request: Request, text: TextStream, prompt: list[int]):
        self.index, self.request, self.text, self.prompt = index, request, text, prompt
        self.sent = 0          # tokens taken so far
        self.done = False
        self.reason: str | None = None
        self.started = False   # whether anything of this choice was sent (the chat role chunk)
        self.observed = False  # whether its timings went into the metrics

    def take(self) -> tuple[list[int], str, list]:
        """(new ids, new text, their logprob records) since the last call; sets `done` and
        `reason` once the request finished or a stop string ended the text."""
        req = self.request
        ids, lps, finished = req.snapshot(self.sent)
        self.sent += len(ids)
        text = self.text.push(ids) if ids else ""
        if self.text.stopped and not req.done:
            req.cancel()  # the stop string is in the text: the engine need not go on
        if finished or self.text.stopped:
            text += self.text.finish()
            self.done, self.reason = True, finish_reason(req, self.text)
        return ids, text, lps


class OpenAIAPI:
    """Request bodies to engine requests and engine output to OpenAI response objects."""

    def __init__(self, engine, *, tokenizer=None, chat_template=None, model_name: str = "model",
                 defaults: SamplingParams = SamplingParams(max_new_tokens=256)):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        eos = engine.cfg.eos_token_id
        self.parser = RequestParser(
            max_seq_len=engine.max_seq_len, tokenizer=tokenizer, chat_template=chat_template,
            model_name=model_name, defaults=defaults, vocab_size=engine.cfg.vocab_size,
            eos_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, t: int) -> str:
        """A token's text in logprobs (`token_id:N` without a tokenizer, as vLLM writes it)."""
        return self.tokenizer.decode([t]) if self.tokenizer else f"token_id:{t}"

    def parse(self, body, chat: bool) -> Job:
        """Validate a request body (dsv3_jax/serve/api_params.py); raises APIError(400)."""
        return self.parser.parse(body, chat)

    def submit(self, job: Job) -> list[ChoiceStream]:
        """One engine request per choice; engine refusals become 400 / 429 / 500 (and cancel the
        choices already queued)."""
        out: list[ChoiceStream] = []
        try:
            for index, prompt, params in job.choices():
                req = self.engine.submit(prompt, params)
                text = TextStream(self.decode if self.tokenizer else None, params.stop, job.hidden_ids)
                out.append(ChoiceStream(index, req, text, prompt))
            return out
        except Exception as e:
            for c in out:
                c.request.cancel()
            if isinstance(e, RequestError):
                raise APIError(400, str(e), code="invalid_request") from None
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                               code="queue_full") from None
            raise APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error",
                           code="engine_error") from None

    # -- response objects --------------------------------------------------------------------

    def head(self, job: Job, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
        return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind,
                "created": job.created, "model": self.model_name}

    def usage(self, job: Job, choices: list[ChoiceStream]) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        done = sum(c.sent for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def echo(self, job: Job, c: ChoiceStream) -> tuple[str, list[int], list]:
        """The echoed prompt of a completion choice: (text, ids, logprob records)."""
        if not job.echo or job.chat:
            return "", [], []
        text = self.decode(c.prompt) if self.tokenizer else ""
        return text, c.prompt, c.request.prompt_logprobs or []

    def logprobs(self, job: Job, ids: list[int], records: list, offset: int = 0) -> dict | None:
        """The `logprobs` object of a choice (or chunk) for these ids and their records."""
        if job.logprobs is None:
            return None
        n = job.logprobs
        if job.chat:
            def entry(t, lp):
                s = self.token_text(t)
                return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode())}
            return {"content": [{**entry(t, r[0]), "top_logprobs": [entry(a, b) for a, b in
                                                                    list(zip(r[1], r[2]))[:n]]}
                                for t, r in zip(ids, records)]}
        tokens, token_lps, tops, offsets = [], [], [], []
        for t, r in zip(ids, records):
            s = self.token_text(t)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if r is None:  # the first prompt token
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(_lp(r[0]))
            top = {self.token_text(a): _lp(b) for a, b in list(zip(r[1], r[2]))[:n]}
            top.setdefault(s, _lp(r[0]))  # the chosen token too, as OpenAI and vLLM do
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def response(self, job: Job, results: list[tuple[ChoiceStream, str, list[int], list]]) -> dict:
        """The non-streaming response: (choice, text, ids, logprob records) per choice."""
        choices = []
        for c, text, ids, records in sorted(results, key=lambda r: r[0].index):
            echo_text, echo_ids, echo_lps = self.echo(job, c)
            choice = {"index": c.index, "token_ids": ids,
                      "logprobs": self.logprobs(job, echo_ids + ids, list(echo_lps) + records),
                      "finish_reason": c.reason}
            if job.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = echo_text + text
            choices.append(choice)
        return {**self.head(job, False), "choices": choices,
                "usage": self.usage(job, [r[0] for r in results])}

    def chunk(self, job: Job, c: ChoiceStream, text: str | None, ids: list[int], records: list,
              finish: str | None = None, role: bool = False, offset: int = 0) -> dict:
        """One streamed event's object for choice `c`."""
        choice = {"index": c.index, "token_ids": ids,
                  "logprobs": self.logprobs(job, ids, records, offset) if ids else None,
                  "finish_reason": finish}
        if job.chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if role else
                               {} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        return {**self.head(job, True), "choices": [choice]}

    def tokenizer_info(self) -> dict:
        """GET /tokenizer_info (vLLM's): the special tokens' strings, the chat template and the
        context; with /tokenize and /detokenize, what lm-eval's remote tokenizer backend needs
        (so `lm_eval --model local-completions` needs no tokenizer files of its own)."""
        self.parser._need_tokenizer("/tokenizer_info", "tokenizer")
        template, cfg = self.parser.chat_template, self.engine.cfg

        def special(text: str, token_id) -> str | None:
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            return text or (None if token_id is None else self.tokenizer.id_to_token(token_id))
        return {"tokenizer_class": "tokenizers.Tokenizer",
                "bos_token": special(template.bos_token, cfg.bos_token_id),
                "eos_token": special(template.eos_token, cfg.eos_token_id),
                "pad_token": None, "chat_template": template.source,
                "model_max_length": self.engine.max_seq_len,
                "vocab_size": self.tokenizer.get_vocab_size()}

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "dsv3-jax", "max_model_len": self.engine.max_seq_len}]}
