"""Held-out evaluation during training (`train.py --eval-corpus PATH --eval-every N`, and with
`--sft` a held-out fraction of the conversations, `--eval-fraction`).

The held-out set is fixed for the whole run (and across resumes). Text is encoded like the
training corpus (same tokenizer, BOS/EOS) and cut into `seq_len + 1` windows, of which the
first `MAX_EVAL_BATCHES` seeded batches are kept (`TokenBatcher` with seed 0, so every process
reads its own slice of each batch). Conversations (chat data) are packed whole, in their order,
into rows with segment ids and the assistant-only loss mask, as fine-tuning packs them (the last
batch filled with empty rows, which weigh nothing). The metric is the main head's next-token
cross entropy averaged over all scored held-out predictions (for chat data: the assistant
tokens), and its perplexity `exp(loss)`; no MTP, no balance term, no update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import data
from dsv3_jax.conversations import Conversation, fill_rows, next_fit
from dsv3_jax.train.losses import lm_loss, weight_sums

MAX_EVAL_BATCHES = 16  # at most this many batches of --batch-size rows: a few seconds per eval


def held_out_batches(tokens, batch_size: int, seq_len: int, *, process_index: int = 0,
                     process_count: int = 1) -> list[tuple[np.ndarray]]:
    """This process's slices of the fixed held-out batches of windows, each a 1-tuple of
    [batch_per_process, seq_len + 1] tokens."""
    batcher = data.TokenBatcher(tokens, batch_size, seq_len, seed=0, process_index=process_index,
                                process_count=process_count)
    return [(batcher.next(),) for _ in range(min(batcher.batches_per_epoch, MAX_EVAL_BATCHES))]


def held_out_conversations(convs: Sequence[Conversation], batch_size: int, seq_len: int, *,
                           pad_id: int, process_index: int = 0, process_count: int = 1
                           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's slices of the fixed held-out batches of whole conversations: (tokens,
    segment ids, loss mask), each [batch_per_process, seq_len + 1]."""
    data.check_batching(batch_size, seq_len, process_index, process_count)
    width, per = seq_len + 1, batch_size // process_count
    rows = next_fit([len(c.ids) for c in convs], width)[:MAX_EVAL_BATCHES * batch_size]
    rows += [[]] * (-len(rows) % batch_size)
    return [fill_rows(convs, rows[b + process_index * per:b + (process_index + 1) * per], width,
                      pad_id) for b in range(0, len(rows), batch_size)]


@nnx.jit
def _batch_loss(model, tokens, segment_ids=None, loss_mask=None):
    """(sum of the main head's CE over the scored predictions, their number) of a step-shaped
    batch [accumulate, micro, seq + 1]."""
    total, count = jnp.zeros(()), jnp.zeros(())
    for i in range(tokens.shape[0]):
        seg, mask = (None if x is None else x[i] for x in (segment_ids, loss_mask))
        _, (parts, _) = lm_loss(model, tokens[i], mtp_lambda=0.0, balance_alpha=0.0,
                                segment_ids=seg, loss_mask=mask)
        n = weight_sums(seg, mask, tokens[i].shape, 0)[0]
        total, count = total + parts["ce"] * jnp.maximum(n, 1.0), count + n  # ce: sum / max(n, 1)
    return total, count


def evaluate(model, batches: list[tuple]) -> dict[str, float]:
    """{"eval_loss", "eval_ppl"} of the model on the held-out `batches` (tuples of global
    arrays: tokens, and for conversations segment ids and loss mask)."""
    sums = np.asarray(jax.device_get([_batch_loss(model, *b) for b in batches]), np.float64)
    loss = float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}
