"""Training loss (SPEC section 6): next-token cross entropy + MTP loss + sequence balance loss.

`total = CE + lambda / D * sum_k CE_k(MTP depth k) + alpha * sum over MoE layers of the
sequence-wise balance term`. All in fp32.

Chunked cross entropy: the vocabulary projection is the largest activation of a step (V3: 129,280
fp32 logits per token, 2.1 GB per 4K-token row, plus their gradient, for each head). The loss
never materialises it: `head_nll` applies the head to all of a device's tokens one chunk of the
vocabulary at a time (`lax.scan`), with an online log-sum-exp in fp32, and its custom VJP
recomputes each chunk's logits in the backward pass. Chunks of the vocabulary, not of the
tokens: each chunk's lm_head gradient is its own slice of the [embed, vocab] gradient (written
in place), whereas token chunks would each produce a whole [embed, vocab] gradient to add up
(one more fp32 copy of lm_head, 3.7 GB for V3, which XLA:CPU keeps live). Peak: one chunk's
logits, probabilities and gradient ([tokens, chunk], `LOGITS_CHUNK_BYTES` per device, from the
local batch rows and vocabulary shard under a mesh) and the [tokens, embed] fp32 gradient of
the hidden states. Same function, loss and gradients as the whole-logits formula (only the
order of the sums differs); the matmuls as in `Transformer.head`: operands in the compute
dtype (`model.head_logits`), fp32 accumulation, the logits' gradient cast to the compute dtype
for the two backward matmuls.

Token weights: each prediction has a weight (1 by default); CE is `sum(weight * nll) /
sum(weight)`. With packed documents (`segment_ids`, the row layout of the batch: same id = same
document, contiguous runs, id 0 = padding) a prediction counts only when its target lies in the
same document as its input position (for MTP depth k: the target k + 1 tokens on) and is not
padding. `loss_mask` (same layout, one value per row token) weighs the prediction OF each token
on top of that, e.g. 0 for prompt tokens in fine-tuning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.model import ModelOutput, Transformer, head_logits
from sharding.rules import logical_to_spec

# fp32 logits of one chunk on one device. V3 (129,280 entries, one 4K row per device): 16 chunks
# of 8,080 entries; each a [tokens, embed] x [embed, chunk] matmul large enough to run at full
# speed on any accelerator. The loss's peak holds about LOSS_CHUNK_BUFFERS such fp32 blocks
# (XLA:CPU fuses the softmax and its gradient into the matmuls' operands; `loss_peak_bytes`).
LOGITS_CHUNK_BYTES = 128 * 2**20
LOSS_CHUNK_BUFFERS = 2


def vocab_chunk(tokens: float, vocab: int, budget: int = LOGITS_CHUNK_BYTES) -> int:
    """Vocabulary entries per loss chunk: the most whose fp32 logits over `tokens` local tokens
    fit `budget` (at least 1), spread evenly over the chunks of the local `vocab` entries."""
    most = max(1, int(budget // (4 * tokens)))
    chunks = -(-vocab // most)
    return -(-vocab // chunks)


def loss_peak_bytes(tokens: float, embed: int, vocab: float, heads: int = 1) -> int:
    """The chunked loss's working set per device, the planner's count (dsv3_jax/plan.py): fp32
    [tokens, chunk] blocks (LOSS_CHUNK_BUFFERS for the first head, one more per other head),
    the chunk's lm_head slice [embed, chunk] in fp32 and the compute dtype, and three fp32
    [tokens, embed] per head (the hidden states' gradient, the final norm's intermediates).
    Within ~20% of XLA:CPU's temporaries from 4K to 16K tokens, 1 or 2 heads
    (benchmarks/chunked_loss.py, tests/test_chunked_loss.py)."""
    chunk = vocab_chunk(tokens, vocab)
    blocks = LOSS_CHUNK_BUFFERS + heads - 1
    return int(blocks * tokens * chunk * 4 + embed * chunk * 6 + heads * 3 * tokens * embed * 4)


def _shards(logical: str, size: int) -> int:
    """How many shards the context mesh cuts a dimension with this logical axis into."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    entry = logical_to_spec((logical,), (size,), mesh)[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in axes)


def head_nll(hidden: Float[Array, "batch seq embed"], lm_head: Float[Array, "embed vocab"],
             targets: Int[Array, "batch seq"], weights: Float[Array, "batch seq"] | None = None, *,
             dtype=jnp.float32, chunk: int | None = None) -> Float[Array, ""]:
    """`sum(weights * -log softmax(head(hidden))[targets])`, `chunk` vocabulary entries at a time
    (None: `vocab_chunk` for the local shard); never more than one chunk's logits live."""
    return heads_nll((hidden,), lm_head, (targets,), (weights,), dtype=dtype, chunk=chunk)[0]


def heads_nll(hidden: Sequence[Float[Array, "batch _ embed"]], lm_head: Float[Array, "embed vocab"],
              targets: Sequence[Int[Array, "batch _"]],
              weights: Sequence[Float[Array, "batch _"] | None], *, dtype=jnp.float32,
              chunk: int | None = None) -> tuple[Float[Array, ""], ...]:
    """`head_nll` of several heads that share `lm_head` (the main head and the MTP depths), in
    one pass over the vocabulary chunks: their lm_head gradients go into one buffer.

    Under a mesh that splits the vocabulary (over "tensor"), each device runs the chunks of its
    own shard. A chunk size that does not divide the vocabulary shard: the last chunk ends at
    the shard's end and counts only the entries no earlier chunk did."""
    hidden, targets = tuple(hidden), tuple(t.astype(jnp.int32) for t in targets)
    weights = tuple(jnp.ones(t.shape, jnp.float32) if w is None else w.astype(jnp.float32)
                    for t, w in zip(targets, weights))
    d, vocab = lm_head.shape
    shards = _shards("vocab", vocab)
    local = vocab // shards
    if chunk is None:
        tokens = max(h.shape[0] / _shards("batch", h.shape[0]) * h.shape[1] for h in hidden)
        chunk = vocab_chunk(tokens, local)
    chunk = min(chunk, local)
    if chunk == local and shards == 1:  # one chunk: the plain formula
        return tuple(_plain_nll(h, lm_head, t, w, dtype) for h, t, w in zip(hidden, targets, weights))
    w = lm_head.reshape(d, shards, local)  # shard t holds entries [t * local, (t + 1) * local)
    return _chunked_nll(hidden, w, targets, weights, dtype, chunk)


def _plain_nll(h, lm_head, targets, weights, dtype):
    logp = jax.nn.log_softmax(head_logits(h, lm_head, dtype), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)


def _chunk_logits(h, w, targets, c, dtype, chunk):
    """Chunk c of one head: (the lm_head slice, fp32 logits [b, s, shards, chunk], the columns
    no earlier chunk covered, the targets' one-hot, the slice start)."""
    shards, local = w.shape[1:]
    start = jnp.minimum(c * chunk, local - chunk)
    wc = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=2)
    logits = jnp.einsum("bsd,dtv->bstv", h.astype(dtype), wc.astype(dtype),
                        preferred_element_type=jnp.float32)
    cols = start + jnp.arange(chunk)
    fresh = cols >= c * chunk
    ids = jnp.arange(shards)[:, None] * local + cols
    hit = (ids == targets[..., None, None]) & fresh
    return wc, logits, fresh, hit, start


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_nll(hs, w, targets, weights, dtype, chunk):
    return _chunked_fwd(hs, w, targets, weights, dtype, chunk)[0]


def _chunked_fwd(hs, w, targets, weights, dtype, chunk):
    """Online log-sum-exp over the chunks: running max, sum of exponentials, target logit."""
    def body(carry, c):
        new = []
        for h, t, (m, total, picked) in zip(hs, targets, carry):
            _, logits, fresh, hit, _ = _chunk_logits(h, w, t, c, dtype, chunk)
            x = jnp.where(fresh, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(x, axis=(-2, -1)))
            total = total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[..., None, None]), (-2, -1))
            new.append((m_new, total, picked + jnp.sum(jnp.where(hit, logits, 0.0), (-2, -1))))
        return tuple(new), None

    n = -(-w.shape[2] // chunk)
    init = tuple((jnp.full(t.shape, -jnp.inf), jnp.zeros(t.shape), jnp.zeros(t.shape)) for t in targets)
    carry, _ = jax.lax.scan(body, init, jnp.arange(n))
    lse = tuple(m + jnp.log(total) for m, total, _ in carry)
    nll = tuple(l - picked for l, (_, _, picked) in zip(lse, carry))
    sums = tuple(jnp.sum(x * wt) for x, wt in zip(nll, weights))
    return sums, (hs, w, targets, weights, lse, nll)


def _chunked_bwd(dtype, chunk, res, gs):
    """Per chunk: softmax - one-hot from the saved log-sum-exp, the hidden states' gradient
    accumulated in fp32, the chunk's slice of lm_head's gradient (all heads) written in place."""
    hs, w, targets, weights, lse, nll = res
    scales = tuple((g * wt)[..., None, None] for g, wt in zip(gs, weights))

    def body(carry, c):
        dhs, dw = carry
        new, dwc, start, fresh = [], 0.0, None, None
        for h, t, l, scale, dh in zip(hs, targets, lse, scales, dhs):
            wc, logits, fresh, hit, start = _chunk_logits(h, w, t, c, dtype, chunk)
            dl = jnp.where(fresh, (jnp.exp(logits - l[..., None, None]) - hit) * scale, 0.0)
            dl = dl.astype(dtype)
            new.append(dh + jnp.einsum("bstv,dtv->bsd", dl, wc.astype(dtype),
                                       preferred_element_type=jnp.float32))
            dwc = dwc + jnp.einsum("bsd,bstv->dtv", h.astype(dtype), dl,
                                   preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=2)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, jnp.where(fresh, dwc.astype(dw.dtype), old),
                                                 start, axis=2)
        return (tuple(new), dw), None

    n = -(-w.shape[2] // chunk)
    init = (tuple(jnp.zeros(h.shape, jnp.float32) for h in hs), jnp.zeros(w.shape, w.dtype))
    (dhs, dw), _ = jax.lax.scan(body, init, jnp.arange(n))
    return (tuple(dh.astype(h.dtype) for dh, h in zip(dhs, hs)), dw, None,
            tuple(g * x for g, x in zip(gs, nll)))


_chunked_nll.defvjp(_chunked_fwd, _chunked_bwd)


def cross_entropy(logits: Float[Array, "batch seq vocab"], targets: Int[Array, "batch seq"],
                  weights: Float[Array, "batch seq"] | None = None) -> Float[Array, ""]:
    """Mean (weighted) next-token cross entropy from materialised logits, in fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if weights is None:
        return jnp.mean(nll)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-30)


def _logits_nll(logits, targets, weights):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll if weights is None else nll * weights)


def prediction_weights(segment_ids: Int[Array, "batch row"] | None,
                       loss_mask: Float[Array, "batch row"] | None, depth: int
                       ) -> Float[Array, "batch _"] | None:
    """Weight of each prediction of a [batch, seq + 1] row at MTP depth `depth` (0: the main
    head): input position i predicts row token i + depth + 1. None when nothing is masked."""
    if segment_ids is None and loss_mask is None:
        return None
    w = None
    if segment_ids is not None:
        src, tgt = segment_ids[:, :-depth - 1], segment_ids[:, depth + 1:]
        w = ((src == tgt) & (src != 0)).astype(jnp.float32)
    if loss_mask is not None:
        m = loss_mask[:, depth + 1:].astype(jnp.float32)
        w = m if w is None else w * m
    return w


def weight_sums(segment_ids, loss_mask, shape: tuple[int, int], depths: int) -> Float[Array, "heads"]:
    """The total prediction weight of each head (main, then MTP depths 1..`depths`) over
    [batch, seq + 1] rows of `shape`: the denominators of their mean losses."""
    b, r = shape
    sums = []
    for k in range(depths + 1):
        w = prediction_weights(segment_ids, loss_mask, k)
        sums.append(jnp.float32(b * (r - 1 - k)) if w is None else jnp.sum(w))
    return jnp.stack(sums)


def loss_from_output(out: ModelOutput, targets: Int[Array, "batch seq"], *, mtp_lambda: float,
                     balance_alpha: float, lm_head=None, dtype=jnp.float32,
                     segment_ids: Int[Array, "batch row"] | None = None,
                     loss_mask: Float[Array, "batch row"] | None = None,
                     denominators: Float[Array, "heads"] | None = None, chunk: int | None = None
                     ) -> tuple[Float[Array, ""], dict]:
    """Total loss and its parts from a forward pass over `targets`' inputs.

    MTP depth k's state at position i predicts token i + k + 1, i.e. `targets[:, k:]`. From
    `out.hidden` / `out.mtp_hidden` through `lm_head` in chunks (`heads_nll`), or from
    `out.logits` / `out.mtp_logits` when the forward pass materialised them. `segment_ids` and
    `loss_mask` are in the row layout ([batch, seq + 1], see the module docstring);
    `denominators` (one per head) replace the batch's own weight sums, so that micro-batches
    of one step are normalised by the step's total (dsv3_jax/train/step.py)."""
    depth = len(out.mtp_logits) or len(out.mtp_hidden)
    if denominators is None:
        b, s = targets.shape
        denominators = weight_sums(segment_ids, loss_mask, (b, s + 1), depth)
    denominators = jnp.maximum(denominators, 1.0)

    weights = [prediction_weights(segment_ids, loss_mask, k) for k in range(depth + 1)]
    heads_targets = [targets[:, k:] for k in range(depth + 1)]
    if out.logits is not None:
        sums = [_logits_nll(lg, t, w) for lg, t, w in
                zip((out.logits, *out.mtp_logits), heads_targets, weights)]
    else:
        sums = heads_nll((out.hidden, *out.mtp_hidden), lm_head, heads_targets, weights,
                         dtype=dtype, chunk=chunk)
    losses = [x / denominators[k] for k, x in enumerate(sums)]
    main = losses[0]
    mtp = sum(losses[1:]) / depth if depth else jnp.zeros((), jnp.float32)
    balance = jnp.sum(out.balance)  # the main stack's MoE layers and each MTP depth's
    if out.mtp_balance is not None:
        balance = balance + jnp.sum(out.mtp_balance)
    total = main + mtp_lambda * mtp + balance_alpha * balance
    return total, {"loss": total, "ce": main, "mtp": mtp, "balance": balance}


def lm_loss(model: Transformer, batch: Int[Array, "batch seq_plus_1"], *, mtp_lambda: float = 0.3,
            balance_alpha: float = 1e-4, segment_ids: Int[Array, "batch seq_plus_1"] | None = None,
            loss_mask: Float[Array, "batch seq_plus_1"] | None = None,
            denominators: Float[Array, "heads"] | None = None, chunk: int | None = None,
            forward=None) -> tuple[Float[Array, ""], tuple[dict, ModelOutput]]:
    """Loss of a [batch, seq + 1] token window (inputs = window[:, :-1], targets = window[:, 1:]).

    `segment_ids` ([batch, seq + 1], 0 = padding): packed documents, attended and scored each on
    its own, positions restarting at each; `loss_mask`: per-token weights of the predictions
    (module docstring). The head runs in chunks (`head_nll`): `out.logits` is None.
    `forward(inputs, *, segment_ids, mtp, logits)` replaces `model.forward` (the pipeline)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    forward = forward or model.forward
    seg_in = None if segment_ids is None else segment_ids[:, :-1]
    out = forward(inputs, segment_ids=seg_in, mtp=mtp_lambda > 0 and len(model.mtp) > 0,
                  logits=False)
    total, parts = loss_from_output(out, targets, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha,
                                    lm_head=model.lm_head[...], dtype=model.dtype,
                                    segment_ids=segment_ids, loss_mask=loss_mask,
                                    denominators=denominators, chunk=chunk)
    return total, (parts, out)
