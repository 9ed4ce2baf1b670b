"""Token sampling in fp32: greedy, temperature, top-k, top-p, with per-request seeds.

Every row carries its own parameters, so one jitted step serves requests with different
settings. The random key of a draw is derived from the request's seed, the position of the
token being drawn and the purpose of the draw (plain sample, draft, accept test, residual):
a request's tokens never depend on what else shares the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# purposes of a random draw (folded into the key)
SAMPLE, DRAFT, ACCEPT, RESIDUAL = 0, 1, 2, 3


@dataclasses.dataclass
class SamplingArrays:
    """Per-row sampling parameters on the device (one row per engine slot)."""

    temperature: Float[Array, "b"]  # 0: greedy
    top_k: Int[Array, "b"]          # 0: off
    top_p: Float[Array, "b"]        # 1: off
    seed: Int[Array, "b"]           # uint32
    # penalties (dsv3_jax/serve/penalties.py); None: no penalties
    presence: Float[Array, "b"] | None = None
    frequency: Float[Array, "b"] | None = None
    repetition: Float[Array, "b"] | None = None
    min_tokens: Int[Array, "b"] | None = None
    bias: Float[Array, "b vocab"] | None = None     # logit_bias, dense
    stop_mask: Array | None = None                  # [b, vocab] bool: the stop tokens (min_tokens)


jax.tree_util.register_dataclass(
    SamplingArrays, data_fields=["temperature", "top_k", "top_p", "seed", "presence", "frequency",
                                 "repetition", "min_tokens", "bias", "stop_mask"], meta_fields=[])


def row_keys(seed: Int[Array, "b"], position: Int[Array, "b"], purpose: int) -> jax.Array:
    """One key per row from (seed, position of the token drawn, purpose)."""
    def one(s, p):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(s), p), purpose)
    return jax.vmap(one)(seed, position)


def greedy(sp: SamplingArrays) -> Bool[Array, "b"]:
    """Rows decoded greedily (temperature 0)."""
    return sp.temperature <= 0


def all_greedy(sp: SamplingArrays) -> Bool[Array, ""]:
    """Whether no row samples (then the sort, the keys and the draws are skipped)."""
    return jnp.all(greedy(sp))


def filtered_logits(logits: Float[Array, "b vocab"], sp: SamplingArrays) -> Float[Array, "b vocab"]:
    """Temperature-scaled fp32 logits with everything outside top-k / top-p set to -inf.

    Order as in transformers: temperature, top-k, top-p; the most likely token always
    survives. Greedy rows are returned unscaled and unfiltered: callers take their argmax."""
    logits = logits.astype(jnp.float32)
    is_greedy = greedy(sp)
    scaled = logits / jnp.where(is_greedy, 1.0, sp.temperature)[:, None]
    needed = jnp.any(~is_greedy & ((sp.top_k > 0) | (sp.top_p < 1)))
    return jax.lax.cond(needed, lambda: _top_k_top_p(scaled, sp), lambda: scaled)


def _top_k_top_p(scaled, sp: SamplingArrays):
    """`scaled` with tokens outside each row's top-k and top-p set to -inf (a sort per row)."""
    v = scaled.shape[-1]
    ranked = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, v), v)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # keep a ranked token while the mass strictly before it is below top_p
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = before < sp.top_p[:, None]
    threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= jnp.maximum(threshold, kth), scaled, -jnp.inf)


def probs(logits: Float[Array, "b vocab"], sp: SamplingArrays) -> Float[Array, "b vocab"]:
    """The distribution a sampled row draws from (greedy rows: softmax of the raw logits)."""
    return jax.nn.softmax(filtered_logits(logits, sp), axis=-1)


def sample(logits: Float[Array, "b vocab"], sp: SamplingArrays, position: Int[Array, "b"],
           purpose: int = SAMPLE) -> Int[Array, "b"]:
    """Next token per row: argmax for greedy rows, else a draw from `filtered_logits`."""
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        drawn = categorical(row_keys(sp.seed, position, purpose), filtered_logits(logits, sp))
        return jnp.where(greedy(sp), best, drawn)

    # the sort and the per-row keys cost more than the model's last layers on CPU: skip them
    # when every row is greedy (a cond runs one branch)
    return jax.lax.cond(all_greedy(sp), lambda _: best, draw, None)


def categorical(keys: jax.Array, logits: Float[Array, "b vocab"]) -> Int[Array, "b"]:
    """One draw per row with its own key (Gumbel-max; -inf logits are never drawn)."""
    return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, logits).astype(jnp.int32)


def logprobs(logits: Float[Array, "b vocab"], tokens: Int[Array, "b"], sp: SamplingArrays, k: int
             ) -> tuple[Float[Array, "b"], Int[Array, "b k"], Float[Array, "b k"]]:
    """(logprob of `tokens`, the top-k ids, their logprobs) of the distribution each row draws
    from, in fp32: `logits` (already penalized) over the row's temperature (greedy rows: the
    logits as they are), before top-k / top-p truncation."""
    logits = logits.astype(jnp.float32)
    scaled = logits / jnp.where(greedy(sp), 1.0, sp.temperature)[:, None]
    lp = jax.nn.log_softmax(scaled, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(lp, k)
    return chosen, ids.astype(jnp.int32), top
