"""Held-out evaluation during training (`train.py --eval-corpus PATH --eval-every N`).

The held-out set is fixed for the whole run (and across resumes): the eval corpus is encoded
like the training corpus (same tokenizer, BOS/EOS) and cut into `seq_len + 1` windows, of which
the first `MAX_EVAL_BATCHES` seeded batches are kept (`TokenBatcher` with seed 0, so every
process reads its own slice of each batch). The metric is the main head's next-token cross
entropy averaged over all held-out predictions (every window has the same number, so the mean
of the batch means), and its perplexity `exp(loss)`; no MTP, no balance term, no update.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import data
from dsv3_jax.train.losses import lm_loss

MAX_EVAL_BATCHES = 16  # at most this many batches of --batch-size windows: a few seconds per eval


def held_out_batches(tokens, batch_size: int, seq_len: int, *, process_index: int = 0,
                     process_count: int = 1) -> list[np.ndarray]:
    """This process's slices of the fixed held-out batches ([batch_per_process, seq_len + 1])."""
    batcher = data.TokenBatcher(tokens, batch_size, seq_len, seed=0, process_index=process_index,
                                process_count=process_count)
    return [batcher.next() for _ in range(min(batcher.batches_per_epoch, MAX_EVAL_BATCHES))]


@nnx.jit
def _batch_loss(model, batches):
    """Mean next-token CE of a step-shaped batch [accumulate, micro, seq + 1]."""
    def one(rows):
        _, (parts, _) = lm_loss(model, rows, mtp_lambda=0.0, balance_alpha=0.0)
        return parts["ce"]

    return jnp.mean(jnp.stack([one(batches[i]) for i in range(batches.shape[0])]))


def evaluate(model, batches: list) -> dict[str, float]:
    """{"eval_loss", "eval_ppl"} of the model on the held-out `batches` (global arrays)."""
    losses = jax.device_get([_batch_loss(model, b) for b in batches])
    loss = float(np.mean(losses))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}
