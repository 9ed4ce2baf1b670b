"""One optimizer step: loss and gradients over the step's micro-batches, AdamW, routing bias.

A step takes `[accumulate, micro_batch, seq + 1]` token windows. Gradients, loss parts and the
per-expert counts are summed over the micro-batches with a `lax.scan` (one compiled body, so
compile time does not grow with `accumulate`); then ONE AdamW update and ONE auxiliary-loss-free
bias update with the step's total counts. The routing bias is therefore constant within a step,
and `accumulate=k` over k equal micro-batches computes the same step as one batch of k times the
size (tested).

Under a mesh with a pipeline axis > 1 the forward pass is `sharding.pipeline.pipeline_forward`
(GPipe over the MoE layers, each batch cut into `microbatches`); the loss, gradients and counts
are the same function of the batch.

Packed documents (`segment_ids`, [accumulate, micro_batch, seq + 1], dsv3_jax/packing.py):
each micro-batch's loss is normalised by the kept predictions of the whole step (the weight
sums of all micro-batches, `losses.weight_sums`), so accumulation still equals one big batch
when micro-batches keep different numbers of tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from dsv3_jax.model import Transformer, unrolled_for_training
from dsv3_jax.train.balance import load_imbalance, update_routing_bias
from dsv3_jax.train.losses import lm_loss, weight_sums
from sharding.pipeline import pipeline_forward, pipeline_stages


def train_step(model: Transformer, optimizer: nnx.Optimizer,
               batches: Int[Array, "accumulate micro seq_plus_1"],
               segment_ids: Int[Array, "accumulate micro seq_plus_1"] | None = None, *,
               mtp_lambda: float = 0.3, balance_alpha: float = 1e-4, bias_gamma: float = 0.001,
               microbatches: int | None = None) -> dict:
    """Update `model` and `optimizer` in place; returns the step's metrics (fp32 scalars/arrays).

    `segment_ids`: packed documents of each row (0 = padding; dsv3_jax/train/losses.py).
    `microbatches`: pipeline micro-batches per micro-batch of `batches` (None: one per pipeline
    stage); used only under a mesh whose pipeline axis is > 1."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward = None
    if pipeline_stages() > 1:
        forward = functools.partial(pipeline_forward, microbatches=microbatches or pipeline_stages())
    k = batches.shape[0]
    depths = len(model.mtp) if mtp_lambda > 0 else 0
    denominators = None
    if segment_ids is not None and k > 1:  # the step's kept predictions, over all micro-batches
        rows = segment_ids.reshape(-1, segment_ids.shape[-1])
        denominators = weight_sums(rows, None, rows.shape, depths) / k

    def loss_fn(p, batch, seg):
        m = nnx.merge(graphdef, p, rest, copy=True)
        fwd = None if forward is None else functools.partial(forward, m)
        total, (parts, out) = lm_loss(m, batch, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha,
                                      segment_ids=seg, denominators=denominators, forward=fwd)
        return total, (parts, out.expert_counts, out.mtp_expert_counts)

    grad_fn = jax.value_and_grad(unrolled_for_training()(loss_fn), has_aux=True)
    if k == 1:
        seg = None if segment_ids is None else segment_ids[0]
        (_, (parts, counts, mtp_counts)), grads = grad_fn(params, batches[0], seg)
    else:
        def micro(total, xs):
            (_, aux), g = grad_fn(params, *xs)
            return jax.tree.map(jnp.add, total, (g, aux)), None

        seg0 = None if segment_ids is None else segment_ids[0]
        shapes = jax.eval_shape(grad_fn, params, batches[0], seg0)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
        (grads, (parts, counts, mtp_counts)), _ = jax.lax.scan(micro, zeros, (batches, segment_ids))
        grads = jax.tree.map(lambda g: g / k, grads)
        parts = jax.tree.map(lambda v: v / k, parts)
    optimizer.update(model, grads)
    update_routing_bias(model, counts, mtp_counts, bias_gamma)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    return dict(parts, grad_norm=grad_norm, imbalance=load_imbalance(counts))

