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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from dsv3_jax.model import Transformer
from dsv3_jax.train.balance import load_imbalance, update_routing_bias
from dsv3_jax.train.losses import lm_loss, loss_from_output
from sharding.pipeline import pipeline_forward, pipeline_stages


def train_step(model: Transformer, optimizer: nnx.Optimizer,
               batches: Int[Array, "accumulate micro seq_plus_1"], *, mtp_lambda: float = 0.3,
               balance_alpha: float = 1e-4, bias_gamma: float = 0.001,
               microbatches: int | None = None) -> dict:
    """Update `model` and `optimizer` in place; returns the step's metrics (fp32 scalars/arrays).

    `microbatches`: pipeline micro-batches per micro-batch of `batches` (None: one per pipeline
    stage); used only under a mesh whose pipeline axis is > 1."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = functools.partial(_pipelined_loss, microbatches=microbatches or pipeline_stages()) \
        if pipeline_stages() > 1 else lm_loss

    def loss_fn(p, batch):
        m = nnx.merge(graphdef, p, rest, copy=True)
        total, (parts, out) = loss(m, batch, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha)
        return total, (parts, out.expert_counts, out.mtp_expert_counts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = batches.shape[0]
    if k == 1:
        (_, (parts, counts, mtp_counts)), grads = grad_fn(params, batches[0])
    else:
        def micro(total, batch):
            (_, aux), g = grad_fn(params, batch)
            return jax.tree.map(jnp.add, total, (g, aux)), None

        shapes = jax.eval_shape(grad_fn, params, batches[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
        (grads, (parts, counts, mtp_counts)), _ = jax.lax.scan(micro, zeros, batches)
        grads = jax.tree.map(lambda g: g / k, grads)
        parts = jax.tree.map(lambda v: v / k, parts)
    optimizer.update(model, grads)
    update_routing_bias(model, counts, mtp_counts, bias_gamma)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    return dict(parts, grad_norm=grad_norm, imbalance=load_imbalance(counts))


def _pipelined_loss(model: Transformer, batch: Int[Array, "batch seq_plus_1"], *, microbatches: int,
                    mtp_lambda: float, balance_alpha: float):
    """`lm_loss` with the forward pass pipelined over the mesh's pipeline axis."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = pipeline_forward(model, inputs, microbatches=microbatches,
                           mtp=mtp_lambda > 0 and len(model.mtp) > 0)
    total, parts = loss_from_output(out, targets, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha)
    return total, (parts, out)
