"""Chat data for supervised fine-tuning: conversations rendered with a chat template, token ids
and the loss mask that keeps only the assistant's tokens.

A file holds one conversation per line in the OpenAI chat format: `{"messages": [{"role": ...,
"content": ...}, ...]}` (a folder: its `.jsonl` files, sorted). Each conversation is rendered
with the checkpoint's jinja chat template (the one serve.py uses, `dsv3_jax.serve.chat`), and an
assistant message's tokens are the ones whose text lies between the rendered prefix before it
(ending with the generation prompt, what serving feeds the model) and the rendering through
it (its content and the template's end-of-turn markup, e.g. DeepSeek's end-of-sentence token).
Only those are trained on: the system and user turns and the template's markup around them
cost nothing. A conversation ends with EOS (added unless the template wrote it); after an
assistant turn it is trained on too, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsv3_jax.data import DataError
from dsv3_jax.serve.chat import FALLBACK, ChatError, ChatTemplate, _compile, check_messages

MIN_SPLIT = 10  # conversations needed before a held-out split is taken from them


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One rendered conversation: token ids, 1 where the token is trained on, its source line."""

    ids: np.ndarray    # int32 [n]
    mask: np.ndarray   # int32 [n]: 1 = an assistant token (its prediction is scored)
    where: str         # "file:line"


def conversation_files(source: str | Path) -> list[Path]:
    """The .jsonl files of `source` (a file, or a folder's sorted .jsonl files)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"chat data folder {path} has no .jsonl files")
        return files
    raise DataError(f"chat data path {path} does not exist")


def read_conversations(files: Sequence[Path]) -> Iterator[tuple[str, list[dict]]]:
    """("file:line", messages) of every non-blank line; a bad line is a DataError naming it."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: line is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise DataError(f"{where}: line has no \"messages\" list (the OpenAI chat "
                                    "format: {\"messages\": [{\"role\": ..., \"content\": ...}]})")
                try:
                    messages = check_messages(record["messages"])
                except ChatError as e:
                    raise DataError(f"{where}: {e}") from None
                if not any(m["role"] == "assistant" for m in messages):
                    raise DataError(f"{where}: the conversation has no assistant message, "
                                    "nothing to train on")
                yield where, messages


def _render(template: ChatTemplate, messages: list[dict], generation_prompt: bool) -> str:
    # ChatTemplate.render always adds the generation prompt; the end of a turn needs it off
    return _compile(template.source).render(messages=messages,
                                            add_generation_prompt=generation_prompt,
                                            bos_token=template.bos_token,
                                            eos_token=template.eos_token)


def assistant_spans(template: ChatTemplate, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    from jinja2 import TemplateError
    try:
        text = _render(template, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(template, messages[:i], True)
            through = _render(template, messages[:i + 1], False)
            if not (text.startswith(before) and text.startswith(through)
                    and len(before) <= len(through)):
                raise ChatError("the chat template renders a conversation's beginning differently "
                                "from the whole: the assistant turns cannot be located")
            spans.append((len(before), len(through)))
    except TemplateError as e:
        raise ChatError(f"the chat template rejected the messages: {e}") from None
    return text, spans


def encode_conversation(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict],
                        eos_id: int, where: str = "") -> Conversation:
    """Token ids and assistant mask of one conversation (module docstring)."""
    try:
        text, spans = assistant_spans(template, messages)
    except ChatError as e:
        raise DataError(f"{where}: {e}") from None
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [0] * len(ids)
    for j, (start, end) in enumerate(enc.offsets):
        mid = (start + end) / 2 if end > start else start
        mask[j] = int(any(a <= mid < b for a, b in spans))
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        mask.append(int(messages[-1]["role"] == "assistant"))
    return Conversation(np.asarray(ids, np.int32), np.asarray(mask, np.int32), where)


def held_out_split(convs: Sequence[Conversation], fraction: float
                   ) -> tuple[list[Conversation], list[Conversation]]:
    """(trained on, held out): about `fraction` of the conversations held out for evaluation.

    Whole conversations, chosen by a hash of their token ids (so the split does not depend on
    the order of the lines or on the seed, and holds across resumes): the ones with the smallest
    hashes, at least one, and every copy of a held-out conversation, so none is also trained on.
    Nothing is held out when `fraction` is 0 or there are fewer than MIN_SPLIT conversations."""
    if not 0 <= fraction < 1:
        raise DataError(f"held-out fraction {fraction} must be in [0, 1)")
    if fraction == 0 or len(convs) < MIN_SPLIT:
        return list(convs), []
    keys = [hashlib.sha256(c.ids.tobytes()).hexdigest() for c in convs]
    want = max(1, round(fraction * len(convs)))
    held: set[str] = set()
    for key in sorted(set(keys)):
        if sum(k in held for k in keys) >= want:
            break
        held.add(key)
    trained = [c for c, k in zip(convs, keys) if k not in held]
    if not trained:
        raise DataError(f"holding out {fraction} of {len(convs)} conversations leaves none to "
                        "train on (they are copies of one another)")
    return trained, [c for c, k in zip(convs, keys) if k in held]


def next_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of indices into `lengths`, filled in order: an item that does not fit closes the row;
    one longer than `width` takes a row of its own (cut to it)."""
    rows, used = [[]], 0
    for i, n in enumerate(lengths):
        n = min(n, width)
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows if rows[0] else []


def fill_rows(convs: Sequence[Conversation], rows: Sequence[Sequence[int]], width: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment ids, loss mask) [len(rows), width] of rows of conversation indices: each
    conversation its own segment 1, 2, ..., cut to `width`; the rest padding (segment 0, mask 0)."""
    shape = (len(rows), width)
    tokens = np.full(shape, pad_id, np.int32)
    segments, mask = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, start=1):
            c = convs[i]
            n = min(len(c.ids), width)
            tokens[r, at:at + n], mask[r, at:at + n] = c.ids[:n], c.mask[:n]
            segments[r, at:at + n] = seg
            at += n
    return tokens, segments, mask


def trainable(conv: Conversation, width: int) -> int:
    """Scored predictions of `conv` in a row of `width` tokens (the first token is no target)."""
    return int(conv.mask[1:width].sum())


def load_conversations(source: str | Path, tokenizer: Tokenizer, eos_id: int,
                       template: ChatTemplate | None = None) -> list[Conversation]:
    """Every conversation of `source` rendered with `template` (default: serving's fallback
    template); an error when nothing is trainable."""
    template = template or FALLBACK
    convs = [encode_conversation(template, tokenizer, messages, eos_id, where)
             for where, messages in read_conversations(conversation_files(source))]
    if not convs:
        raise DataError(f"chat data {source} holds no conversation")
    if not any(c.mask.any() for c in convs):
        raise DataError(f"chat data {source}: no assistant token survives the rendering, "
                        "nothing to train on")
    return convs


class ConversationPacker:
    """Seeded, resumable rows of whole conversations: (tokens, segment ids, loss mask), each
    [batch_per_process, seq_len + 1].

    Each epoch the conversations are taken in a permutation seeded by (seed, epoch) and packed
    next fit: one that does not fit closes the row (the rest is padding: segment id 0, mask 0).
    A conversation is never split across rows; one longer than a row is cut to a row's length
    (`truncated` counts them, `untrainable` those of them cut before any assistant token; when
    that is every conversation, an error). Every process reads its own contiguous slice of each global
    batch; `state()` / `restore` as `dsv3_jax.data.TokenBatcher`."""

    def __init__(self, conversations: Sequence[Conversation], batch_size: int, seq_len: int,
                 seed: int = 0, *, pad_id: int = 0, process_index: int = 0, process_count: int = 1):
        from dsv3_jax.data import check_batching
        check_batching(batch_size, seq_len, process_index, process_count)
        self.convs = list(conversations)
        self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.batch_per_process = batch_size // process_count
        self.truncated = sum(len(c.ids) > seq_len + 1 for c in self.convs)
        # conversations whose assistant tokens all lie past the cut: they train on nothing
        self.untrainable = sum(trainable(c, seq_len + 1) == 0 for c in self.convs)
        if self.convs and self.untrainable == len(self.convs):
            raise DataError(f"no conversation has an assistant token within its first --seq-len "
                            f"{seq_len} + 1 tokens ({self.truncated} of {len(self.convs)} are "
                            "longer and cut): nothing to train on; raise --seq-len")
        self.epoch, self.position = 0, 0
        self._rows_epoch, self._rows = -1, []
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(self.convs)} conversations pack into {len(self._layout())} rows "
                            f"of --seq-len {seq_len} + 1 tokens, fewer than --batch-size "
                            f"{batch_size}")

    def _layout(self) -> list[list[int]]:
        """This epoch's rows, each a list of conversation indices."""
        if self._rows_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.convs))
            rows = next_fit([len(self.convs[i].ids) for i in order], self.seq_len + 1)
            self._rows = [[int(order[j]) for j in row] for row in rows]
            self._rows_epoch = self.epoch
        return self._rows

    @property
    def batches_per_epoch(self) -> int:
        return len(self._layout()) // self.batch_size

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This process's slice of the next global batch: (tokens, segment ids, loss mask)."""
        first = self.position * self.batch_size + self.process_index * self.batch_per_process
        rows = self._layout()[first:first + self.batch_per_process]
        batch = fill_rows(self.convs, rows, self.seq_len + 1, self.pad_id)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state(self) -> dict:
        return {"conversations": len(self.convs), "seed": self.seed, "epoch": self.epoch,
                "position": self.position, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a packer over the same conversations and sizes."""
        if "conversations" not in state:
            raise DataError("the checkpoint's run trained on a corpus, not chat data; resume it "
                            "without --sft")
        mine = self.state()
        for field in ("conversations", "batch_size", "seq_len"):
            if state.get(field) != mine[field]:
                raise DataError(f"the checkpoint's data state has {field}={state.get(field)} but "
                                f"this run has {mine[field]}; resuming would not continue the "
                                "same batches")
        self.seed, self.epoch, self.position = (int(state[k]) for k in ("seed", "epoch", "position"))
        self._rows_epoch = -1
