"""Training loss (SPEC section 6): next-token cross entropy + MTP loss + sequence balance loss.

`total = CE + lambda / D * sum_k CE_k(MTP depth k) + alpha * sum over MoE layers of the
sequence-wise balance term`. All in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.model import ModelOutput, Transformer


def cross_entropy(logits: Float[Array, "batch seq vocab"], targets: Int[Array, "batch seq"]
                  ) -> Float[Array, ""]:
    """Mean next-token cross entropy, computed in fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def loss_from_output(out: ModelOutput, targets: Int[Array, "batch seq"], *, mtp_lambda: float,
                     balance_alpha: float) -> tuple[Float[Array, ""], dict]:
    """Total loss and its parts from a forward pass over `targets`' inputs.

    MTP depth k's logits at position i predict token i + k + 1, i.e. `targets[:, k:]`."""
    ce = cross_entropy(out.logits, targets)
    mtp = jnp.zeros((), jnp.float32)
    if out.mtp_logits:
        depth = len(out.mtp_logits)
        mtp = sum(cross_entropy(lg, targets[:, k:]) for k, lg in enumerate(out.mtp_logits, 1)) / depth
    balance = jnp.sum(out.balance)
    total = ce + mtp_lambda * mtp + balance_alpha * balance
    return total, {"loss": total, "ce": ce, "mtp": mtp, "balance": balance}


def lm_loss(model: Transformer, batch: Int[Array, "batch seq_plus_1"], *, mtp_lambda: float = 0.3,
            balance_alpha: float = 1e-4) -> tuple[Float[Array, ""], tuple[dict, ModelOutput]]:
    """Loss of a [batch, seq + 1] token window (inputs = window[:, :-1], targets = window[:, 1:])."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = model.forward(inputs, mtp=mtp_lambda > 0 and len(model.mtp) > 0)
    total, parts = loss_from_output(out, targets, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha)
    return total, (parts, out)
