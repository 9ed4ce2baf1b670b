"""Auxiliary-loss-free load balancing (SPEC section 6).

After each optimizer step, for each MoE layer: `b_i += gamma * sign(mean_load - load_i)` with
the GLOBAL per-expert token counts of the step (the forward pass returns them already summed
over all data and expert shards). The bias gets no gradient, no weight decay and no optimizer
state: it is a `RoutingBias` variable, not an `nnx.Param`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.model import Transformer


def bias_step(bias: Float[Array, "*layers experts"], counts: Int[Array, "*layers experts"],
              gamma: float) -> Float[Array, "*layers experts"]:
    """One update: raise the bias of under-loaded experts, lower it for over-loaded ones."""
    load = counts.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + gamma * jnp.sign(mean - load)


def update_routing_bias(model: Transformer, expert_counts: Int[Array, "moe_layers experts"],
                        mtp_expert_counts: Int[Array, "depth experts"] | None, gamma: float) -> None:
    """Apply `bias_step` in place to every sigmoid-gate bias (main MoE layers and MTP).

    The counts are a whole optimizer step's (`ModelOutput.expert_counts`, summed over
    micro-batches); the MTP biases move only when the MTP modules ran."""
    if isinstance(gamma, (int, float)) and gamma == 0 or model.cfg.topk_method != "noaux_tc":
        return  # (gamma may also be a traced scalar: one compiled step for several gammas)
    if model.moe_layers is not None:
        var = model.moe_layers.mlp.gate.e_score_correction_bias
        var.set_value(bias_step(var.get_value(), expert_counts, gamma))
    for k, module in enumerate(model.mtp):
        if mtp_expert_counts is None:
            break
        var = module.block.mlp.gate.e_score_correction_bias
        var.set_value(bias_step(var.get_value(), mtp_expert_counts[k], gamma))


def load_imbalance(counts: Int[Array, "layers experts"]) -> Float[Array, "layers"]:
    """max / mean expert load per layer (1.0 is perfect balance)."""
    load = counts.astype(jnp.float32)
    return jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)

