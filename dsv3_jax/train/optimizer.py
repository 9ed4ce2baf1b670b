"""AdamW as the DeepSeek-V3 report trains (SPEC section 6).

beta1 0.9, beta2 0.95, weight decay 0.1 on matrices only (not norm gains, not the routing
bias, which is not a Param at all), global-norm clipping 1.0, linear warmup then cosine decay,
optional bf16 moments. Gradient accumulation happens inside the step (train/step.py), so the
routing bias moves once per optimizer step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.model import Transformer


def decay_mask(model: Transformer):
    """True for matrices (weights drawn at init: projections, experts, embedding, head)."""
    params = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: "init_std" in v.get_metadata(), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, final_lr_fraction: float = 0.1
                ) -> optax.Schedule:
    """Learning rate by optimizer step: linear from 0 to `lr` over `warmup_steps`, then a cosine
    down to `lr * final_lr_fraction` at `total_steps` (held after it)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, warmup_steps), max(total_steps, warmup_steps + 1), lr * final_lr_fraction)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (the same empty state, so checkpoints do not change) with the
    gradients multiplied by one factor, min(1, max_norm / norm), instead of divided by the norm:
    XLA folds a product into both moment updates that read the gradient, where it wrote the
    divided gradients out as a pass of their own (XLA:CPU, benchmarks/moe_speed.py's 64-expert
    step: 3 instead of 4 passes over each expert weight stack in the AdamW update)."""
    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(model: Transformer, *, lr: float = 3e-4, warmup_steps: int = 100,
                   total_steps: int = 1000, final_lr_fraction: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, weight_decay: float = 0.1, clip_norm: float = 1.0,
                   moments_dtype=None) -> optax.GradientTransformation:
    """The optax chain: clip -> AdamW(schedule, decay on matrices)."""
    schedule = lr_schedule(lr, warmup_steps, total_steps, final_lr_fraction)
    return optax.chain(
        clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mu_dtype=moments_dtype,
                    mask=decay_mask(model)))
