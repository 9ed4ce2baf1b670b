"""Text around the engine: chat messages to a prompt, and generated ids to text with stop strings.

Chat prompts are rendered with the checkpoint's jinja chat template (as transformers'
`apply_chat_template` does: `messages`, `add_generation_prompt=True`, `bos_token`,
`eos_token`). Without one, FALLBACK_TEMPLATE is used: one `<|role|>\\ncontent\\n` block per
message, then `<|assistant|>\\n`.

`TextStream` turns a growing list of generated ids into text that is safe to send: text that
could still become the start of a stop string, or an incomplete UTF-8 character, is held
back until the next ids decide it; a stop string ends the text before it (OpenAI semantics).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from dsv3_jax.serve.detokenize import IncrementalText

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatError(ValueError):
    """Chat messages that cannot be rendered; the message names the bad value."""


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatError(f"the chat template does not compile: {e}") from None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the special-token strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending with the assistant's generation prompt."""
        from jinja2 import TemplateError
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=True,
                                                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatError(f"the chat template rejected the messages: {e}") from None


FALLBACK = ChatTemplate(FALLBACK_TEMPLATE)


def check_messages(messages) -> list[dict]:
    """Messages as [{"role", "content": str}, ...]; text parts of list contents are joined."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"'messages' must be a non-empty list of {{role, content}} objects, "
                        f"got {messages!r:.100}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatError(f"messages[{i}] must be an object with a string 'role', got {m!r:.100}")
        if m["role"] not in ROLES:
            raise ChatError(f"messages[{i}].role {m['role']!r} is not one of {ROLES}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ChatError(f"messages[{i}].content[{j}] must be a text part "
                                    f"{{'type': 'text', 'text': ...}}, got {part!r:.100}")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string or a list of text parts, "
                            f"got {content!r:.100}")
        out.append({**m, "content": content})
    return out


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could begin a stop string or a split character."""
    split = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD
    text = text[:len(text) - split]
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return split + hold


class TextStream:
    """Generated ids in, sendable text out: `push(ids) -> str`, then `finish() -> str`.

    Decodes incrementally (dsv3_jax/serve/detokenize.py): per push only a bounded tail of the
    ids, and stop strings are searched in the unsent text plus the last sent characters."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str] = (),
                 hidden_ids: Sequence[int] = ()):
        self.text = None if decode is None else IncrementalText(decode)
        self.stop = tuple(stop)
        self.hidden = frozenset(hidden_ids)   # ids never shown as text (EOS)
        self.span = max(map(len, self.stop), default=1) - 1  # sent characters a stop can reach back
        self.unsent = ""       # decoded text held back (a possible start of a stop string)
        self.sent_tail = ""    # the last `span` characters already returned
        self.stopped = False   # a stop string was found: no more text

    def push(self, ids: Sequence[int]) -> str:
        """Text that became final with these ids ('' while held back or after a stop string)."""
        if self.stopped or self.text is None:
            return ""
        text = self.unsent + self.text.push([int(t) for t in ids if int(t) not in self.hidden])
        search = self.sent_tail + text
        cut = min((i for i in (search.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = max(cut - len(self.sent_tail), 0)
        else:
            end = len(text) - _held_back(text, self.stop)
        new, self.unsent = text[:end], text[end:]
        if self.span:
            self.sent_tail = (self.sent_tail + new)[-self.span:]
        return new

    def finish(self) -> str:
        """The rest of the text once generation ended (held-back text is final now)."""
        if self.stopped or self.text is None:
            return ""
        new, self.unsent = self.unsent + self.text.finish(), ""
        return new


def stream_text(request, text: TextStream):
    """(new ids, new text) as `request` (an engine Request) produces them, then the held-back rest.

    A stop string seen here before the engine stops on it cancels the request; afterwards
    `finish_reason(request, text)` gives the OpenAI finish reason.
    """
    for ids in request.stream():
        yield list(ids), text.push(ids)
        if text.stopped:
            if request.finish_reason is None:
                request.cancel()
            break
    rest = text.finish()
    if rest:
        yield [], rest


def finish_reason(request, text: TextStream) -> str | None:
    """"stop" when a stop string ended the text, else the engine's reason."""
    return "stop" if text.stopped else request.finish_reason
