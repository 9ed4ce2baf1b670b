"""What a training run reads: its training batches and its fixed held-out set.

Training data (`RunConfig`): corpus windows (`data.TokenBatcher`, DeepSeek-V3's pretraining),
whole documents packed with segment ids (`packing.DocumentPacker`, --pack-documents), or chat
conversations (`conversations.ConversationPacker`, --sft) rendered with the chat template of
the checkpoint the run starts from (--init-from-hf DIR, as serve.py renders them) or serving's
default one, and trained on the assistant tokens only.

Held-out data (dsv3_jax/train/evaluate.py): --eval-corpus PATH, text, or chat data (.jsonl
files of {"messages": ...} lines, scored on their assistant tokens like --sft); with --sft and
no --eval-corpus, the conversations `conversations.held_out_split` holds out of training
(--eval-fraction, default 2%, never also trained on). Errors are `data.DataError`s naming the
flag.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from dsv3_jax import data
from dsv3_jax.conversations import (MIN_SPLIT, ConversationPacker, conversation_files,
                                    held_out_split, load_conversations, trainable)
from dsv3_jax.packing import DocumentPacker
from dsv3_jax.train.evaluate import held_out_batches, held_out_conversations


@dataclasses.dataclass
class RunData:
    """The training batcher, its token count, and this process's slices of the held-out batches
    (tuples of host arrays; None: no evaluation)."""

    batcher: data.TokenBatcher | DocumentPacker | ConversationPacker
    num_tokens: int
    held_out: list[tuple[np.ndarray, ...]] | None


def chat_template(run):
    """The chat template of --init-from-hf DIR (None: serving's default template)."""
    if not run.init_from_hf:
        return None
    from dsv3_jax.serve.loading import LoadError, _chat_template
    try:
        return _chat_template(Path(run.init_from_hf))
    except LoadError as e:
        raise data.DataError(f"--init-from-hf: {e}") from None


def is_chat_data(source: str) -> bool:
    """Whether `source` is .jsonl chat data: its first record has a "messages" list."""
    try:
        files = conversation_files(source)
    except data.DataError:
        return False
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return False
                    return isinstance(record, dict) and "messages" in record
    return False


def load_run_data(run, files, tokenizer, bos: int | None, eos: int, layout: dict,
                  log=print) -> RunData:
    """The run's training batcher and held-out batches (module docstring)."""
    if run.eval_every < 0:
        raise data.DataError(f"--eval-every {run.eval_every}: must be >= 0 (0: at each checkpoint)")
    template = chat_template(run) if run.sft or run.eval_corpus else None
    held_convs = None
    if run.sft:
        batcher, held_convs = _sft(run, tokenizer, eos, template, layout, log)
        num_tokens = sum(len(c.ids) for c in batcher.convs)
    else:
        tokens = data.encode_corpus(files, tokenizer, eos_id=eos, bos_id=bos)
        num_tokens = len(tokens)
        if run.pack_documents:
            batcher = DocumentPacker(tokens, run.batch_size, run.seq_len, eos_id=eos, **layout)
        else:
            batcher = data.TokenBatcher(tokens, run.batch_size, run.seq_len, **layout)
    places = dict(process_index=layout["process_index"], process_count=layout["process_count"])
    if run.eval_corpus:
        flag = f"--eval-corpus {run.eval_corpus}"
        try:
            if is_chat_data(run.eval_corpus):
                held_convs = load_conversations(run.eval_corpus, tokenizer, eos, template)
            else:
                tokens = data.encode_corpus(data.corpus_files(run.eval_corpus), tokenizer,
                                            eos_id=eos, bos_id=bos)
                return RunData(batcher, num_tokens, held_out_batches(
                    tokens, run.batch_size, run.seq_len, **places))
        except data.DataError as e:
            raise data.DataError(f"{flag}: {e}") from None
    else:
        flag = f"--sft {run.sft} --eval-fraction {run.eval_fraction}"
    if not held_convs:
        if run.eval_every:
            raise data.DataError(f"--eval-every {run.eval_every} needs a held-out set: "
                                 "--eval-corpus PATH, or --sft with --eval-fraction > 0")
        return RunData(batcher, num_tokens, None)
    if not sum(trainable(c, run.seq_len + 1) for c in held_convs):
        raise data.DataError(f"{flag}: the held-out conversations have no assistant token within "
                             f"--seq-len {run.seq_len} + 1 tokens of their start")
    return RunData(batcher, num_tokens, held_out_conversations(
        held_convs, run.batch_size, run.seq_len, pad_id=eos, **places))


def _sft(run, tokenizer, eos: int, template, layout: dict, log):
    """--sft: (the packer of the trained conversations, the held-out ones or None)."""
    if run.pack_documents:
        raise data.DataError("--sft packs whole conversations itself; drop --pack-documents")
    try:
        convs = load_conversations(run.sft, tokenizer, eos, template)
        held = []
        if not run.eval_corpus:
            convs, held = held_out_split(convs, run.eval_fraction)
        batcher = ConversationPacker(convs, run.batch_size, run.seq_len, pad_id=eos, **layout)
    except data.DataError as e:
        raise data.DataError(f"--sft {run.sft}: {e}") from None
    trained = sum(trainable(c, run.seq_len + 1) for c in convs)
    total = sum(len(c.ids) for c in convs)
    if run.eval_corpus:
        split = "none held out (--eval-corpus evaluates)"
    elif held:
        split = (f"{len(held)} held out for evaluation (--eval-fraction {run.eval_fraction}, "
                 f"{sum(len(c.ids) for c in held):,} tokens)")
    elif run.eval_fraction:
        split = f"none held out (fewer than {MIN_SPLIT} conversations)"
    else:
        split = "none held out (--eval-fraction 0)"
    log(f"fine-tuning on {len(convs)} conversations ({run.sft}; {split}; chat template: "
        f"{'--init-from-hf' if template else 'serving default'}): {total:,} tokens, {trained:,} "
        f"of them assistant tokens (trained on); {batcher.truncated} conversations longer than "
        f"--seq-len {run.seq_len} + 1 were cut to it"
        + (f", {batcher.untrainable} of them before any assistant token" if batcher.untrainable
           else ""))
    return batcher, held
