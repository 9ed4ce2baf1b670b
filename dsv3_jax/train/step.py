"""One optimizer step: loss and gradients over the step's micro-batches, AdamW, routing bias.

A step takes `[accumulate, micro_batch, seq + 1]` token windows. Gradients, loss parts and the
per-expert counts are summed over the micro-batches with a `lax.scan` (one compiled body, so
compile time does not grow with `accumulate`); then ONE AdamW update and ONE auxiliary-loss-free
bias update with the step's total counts. The routing bias is therefore constant within a step,
and `accumulate=k` over k equal micro-batches computes the same step as one batch of k times the
size (tested).

Under a mesh with a pipeline axis > 1 the forward pass is `sharding.pipeline.pipeline_forward`
(GPipe over the MoE layers, each batch cut into `microbatches`), or with another
`pipeline_schedule` (1f1b, zb, dualpipev) the loss is `sharding.scheduled_pipeline.
pipeline_lm_loss` (explicit per-stage backward passes in the schedule's order); the loss,
gradients and counts are the same function of the batch.

Packed documents (`segment_ids`, [accumulate, micro_batch, seq + 1], dsv3_jax/packing.py):
each micro-batch's loss is normalised by the kept predictions of the whole step (the weight
sums of all micro-batches, `losses.weight_sums`), so accumulation still equals one big batch
when micro-batches keep different numbers of tokens.

`trained_tokens` in the metrics: the step's scored predictions of the main head (all tokens of
plain windows; without padding and document ends when packed; the assistant's tokens in
fine-tuning), the denominator of its cross entropy.

Non-finite steps: when the loss or the global gradient norm is inf or NaN the step changes
nothing (`update_if_finite`) and reports `skipped = 1`; the loop counts consecutive skips
(`--max-skipped`).
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
from sharding.scheduled_pipeline import pipeline_lm_loss


def train_step(model: Transformer, optimizer: nnx.Optimizer,
               batches: Int[Array, "accumulate micro seq_plus_1"],
               segment_ids: Int[Array, "accumulate micro seq_plus_1"] | None = None,
               loss_mask: Int[Array, "accumulate micro seq_plus_1"] | None = None, *,
               mtp_lambda: float = 0.3, balance_alpha: float = 1e-4, bias_gamma: float = 0.001,
               microbatches: int | None = None, pipeline_schedule: str = "gpipe") -> dict:
    """Update `model` and `optimizer` in place; returns the step's metrics (fp32 scalars/arrays).

    `segment_ids`: packed documents of each row (0 = padding; dsv3_jax/train/losses.py).
    `loss_mask`: 1 where a row token is a scored target (fine-tuning: the assistant's tokens).
    `microbatches`: pipeline micro-batches per micro-batch of `batches` (None: one per pipeline
    stage); used only under a mesh whose pipeline axis is > 1, as `pipeline_schedule`
    (sharding/schedules.py)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward, loss = None, lm_loss
    if pipeline_stages() > 1 and pipeline_schedule == "gpipe":
        forward = functools.partial(pipeline_forward, microbatches=microbatches or pipeline_stages())
    elif pipeline_stages() > 1:
        loss = functools.partial(pipeline_lm_loss, schedule=pipeline_schedule,
                                 microbatches=microbatches or pipeline_stages())
    k = batches.shape[0]
    depths = len(model.mtp) if mtp_lambda > 0 else 0
    # the step's kept predictions, over all micro-batches (the main head's: its trained tokens)
    flat = [None if x is None else x.reshape(-1, x.shape[-1]) for x in (segment_ids, loss_mask)]
    step_shape = (k * batches.shape[1], batches.shape[2])
    denominators = None
    if (segment_ids is not None or loss_mask is not None) and k > 1:
        denominators = weight_sums(*flat, step_shape, depths) / k

    def loss_fn(p, batch, seg, mask):
        m = nnx.merge(graphdef, p, rest, copy=True)
        fwd = {} if forward is None else {"forward": functools.partial(forward, m)}
        total, (parts, out) = loss(m, batch, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha,
                                   segment_ids=seg, loss_mask=mask, denominators=denominators,
                                   **fwd)
        return total, (parts, out.expert_counts, out.mtp_expert_counts)

    grad_fn = jax.value_and_grad(unrolled_for_training()(loss_fn), has_aux=True)
    if k == 1:
        first = [None if x is None else x[0] for x in (segment_ids, loss_mask)]
        (_, (parts, counts, mtp_counts)), grads = grad_fn(params, batches[0], *first)
    else:
        def micro(total, xs):
            (_, aux), g = grad_fn(params, *xs)
            return jax.tree.map(jnp.add, total, (g, aux)), None

        first = [None if x is None else x[0] for x in (segment_ids, loss_mask)]
        shapes = jax.eval_shape(grad_fn, params, batches[0], *first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
        (grads, (parts, counts, mtp_counts)), _ = jax.lax.scan(micro, zeros,
                                                            (batches, segment_ids, loss_mask))
        grads = jax.tree.map(lambda g: g / k, grads)
        parts = jax.tree.map(lambda v: v / k, parts)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(parts["loss"]) & jnp.isfinite(grad_norm)

    def update(model, optimizer):
        optimizer.update(model, grads)
        update_routing_bias(model, counts, mtp_counts, bias_gamma)

    update_if_finite(update, (model, optimizer), finite)
    return dict(parts, grad_norm=grad_norm, imbalance=load_imbalance(counts),
                skipped=(~finite).astype(jnp.int32),
                trained_tokens=weight_sums(*flat, step_shape, 0)[0])


def update_if_finite(update, state_owner: tuple, finite) -> None:
    """`update(*state_owner)` (in place) if `finite` (a traced bool), else nothing.

    A `lax.cond` inside the step, so skipping costs no host round trip: a step whose loss or
    gradient norm is inf/NaN leaves the parameters, the AdamW moments and step counts and the
    routing bias as they were (gradient clipping would otherwise turn an inf gradient into NaN
    parameters). A cond, not a select of the new state against the old: the select read the
    whole state once more (~5% of the 64-expert CPU step of benchmarks/moe_speed.py)."""
    graphdef, state = nnx.split(state_owner)

    def updated(state):
        owner = nnx.merge(graphdef, state)
        update(*owner)
        return nnx.state(owner)

    nnx.update(state_owner, jax.lax.cond(finite, updated, lambda state: state, state))
