"""MTP speculative decoding (SPEC section 6): MTP depth 1 drafts one token, the model verifies it.

Each step feeds the main model two tokens per slot, `[last, draft]` at positions `[p, p + 1]`:
its logits at p judge the draft and its logits at p + 1 give a bonus token when the draft is
accepted, so a step commits one or two tokens. Greedy rows accept iff the draft equals the
argmax, which makes the output exactly that of plain greedy decoding. Sampled rows use
speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept the draft d ~ q with
probability min(1, p(d) / q(d)), otherwise draw from normalise(max(p - q, 0)); the committed
tokens are then distributed exactly as p, the same filtered distribution (temperature, top-k,
top-p) that plain sampling uses, though the individual draws differ from a plain run's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dsv3_jax.serve.sampling import (ACCEPT, DRAFT, RESIDUAL, SAMPLE, SamplingArrays, all_greedy,
                                     categorical, greedy, probs, row_keys, sample)


def draft(mtp_logits: Float[Array, "b vocab"], sp: SamplingArrays, position: Int[Array, "b"]
          ) -> tuple[Int[Array, "b"], Float[Array, "b vocab"]]:
    """The drafted token for `position` and the draft distribution q it was drawn from
    (q is only used for sampled rows; all-greedy batches skip computing it)."""
    best = jnp.argmax(mtp_logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        q = probs(mtp_logits, sp)
        drawn = categorical(row_keys(sp.seed, position, DRAFT), jnp.log(q))
        return jnp.where(greedy(sp), best, drawn), q

    zeros = jnp.zeros(mtp_logits.shape, jnp.float32)
    return jax.lax.cond(all_greedy(sp), lambda _: (best, zeros), sampled, None)


def verify(logits0: Float[Array, "b vocab"], logits1: Float[Array, "b vocab"], drafted: Int[Array, "b"],
           q: Float[Array, "b vocab"], sp: SamplingArrays, position: Int[Array, "b"]
           ) -> tuple[Int[Array, "b 2"], Bool[Array, "b"]]:
    """Judge the draft for `position + 1`: tokens for positions (p + 1, p + 2) and acceptance.

    `logits0` / `logits1` are the main model's logits at p (after the last committed token) and
    at p + 1 (after the draft); the second token is meaningful only when the draft is accepted."""
    best = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
    greedy_accepted = drafted == best

    def sampled(_):
        p0 = probs(logits0, sp)
        p_d = jnp.take_along_axis(p0, drafted[:, None], axis=-1)[:, 0]
        q_d = jnp.take_along_axis(q, drafted[:, None], axis=-1)[:, 0]
        u = jax.vmap(jax.random.uniform)(row_keys(sp.seed, position + 1, ACCEPT))
        accepted = jnp.where(greedy(sp), greedy_accepted, u * q_d < p_d)
        residual = jnp.maximum(p0 - q, 0.0)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p0)
        corrected = categorical(row_keys(sp.seed, position + 1, RESIDUAL), jnp.log(residual))
        return accepted, jnp.where(greedy(sp), best, corrected)

    accepted, corrected = jax.lax.cond(all_greedy(sp), lambda _: (greedy_accepted, best), sampled, None)
    first = jnp.where(accepted, drafted, corrected)
    bonus = sample(logits1, sp, position + 2, SAMPLE)
    return jnp.stack([first, bonus], axis=1).astype(jnp.int32), accepted
