"""Sampling penalties (OpenAI / vLLM semantics): logit_bias, min_tokens, repetition, frequency
and presence penalties, from each slot's token history kept on the device.

`History` holds, per engine slot, how often each token was generated and which tokens the prompt
holds; the device programs update it with every committed token, so decode steps stay chained
on the device. `penalize` is applied to the fp32 logits before temperature, in vLLM's order:
  1. logit_bias is added;
  2. while fewer than `min_tokens` tokens were generated, the request's stop tokens get -inf;
  3. repetition_penalty r (prompt and generated tokens): a positive logit is divided by r, a
     negative one multiplied (Keskar et al. 2019, as transformers and vLLM do);
  4. frequency_penalty f and presence_penalty p (generated tokens): logit - f * count - p * (count > 0).
With the neutral values (bias 0, r = 1, f = p = 0) the logits are returned bit-identical.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sharding.rules import constrain


@dataclasses.dataclass
class History:
    """Per-slot token history: generated-token counts and the prompt's tokens."""

    counts: Int[Array, "b vocab"]
    prompt: Bool[Array, "b vocab"]

    def pinned(self) -> "History":
        """Laid out like the slots (every step sees the same input shardings)."""
        return History(constrain(self.counts, ("batch", None)), constrain(self.prompt, ("batch", None)))

    def add(self, tokens: Int[Array, "b"], mask: Bool[Array, "b"]) -> "History":
        """Count `tokens[i]` as generated in slot i where `mask[i]`."""
        rows = jnp.arange(tokens.shape[0])
        return History(self.counts.at[rows, tokens].add(mask.astype(jnp.int32)), self.prompt)

    def add_rows(self, rows: Int[Array, "n"], tokens: Int[Array, "n"], mask: Bool[Array, "n"]) -> "History":
        """Count `tokens[i]` as generated in slot `rows[i]` where `mask[i]` (rows == batch dropped)."""
        r = jnp.where(mask, rows, self.counts.shape[0])
        return History(self.counts.at[r, tokens].add(1, mode="drop"), self.prompt).pinned()

    def begin(self, slot: Int[Array, ""], prefix: Int[Array, "s"], length: Int[Array, ""]) -> "History":
        """Slot `slot` starts a request whose first `length` prompt tokens `prefix[:length]` come
        from the prefix cache (its prefill then starts at `length`, so it does not clear the slot)."""
        counts = self.counts.at[slot].set(0)
        ids = jnp.where(jnp.arange(prefix.shape[0]) < length, prefix, self.counts.shape[1])
        prompt = self.prompt.at[slot].set(False).at[slot, ids].set(True, mode="drop")
        return History(counts, prompt).pinned()

    def rows(self, rows: Int[Array, "n"]) -> "History":
        """Slots `rows` (a padding row, == batch, reads the last slot: its results are dropped)."""
        rows = jnp.minimum(rows, self.counts.shape[0] - 1)
        return History(self.counts[rows], self.prompt[rows])

    def start_prompts(self, rows: Int[Array, "n"], fresh: Bool[Array, "n"], ids: Int[Array, "n s"],
                      lengths: Int[Array, "n"]) -> "History":
        """Slots `rows` begin (where `fresh`: cleared) or continue prefilling `ids[i, :lengths[i]]`
        (rows == batch are dropped)."""
        b = self.counts.shape[0]
        clear = jnp.where(fresh, rows, b)
        counts = self.counts.at[clear].set(0, mode="drop")
        prompt = self.prompt.at[clear].set(False, mode="drop")
        valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        r = jnp.where(valid, rows[:, None], b)
        prompt = prompt.at[r, ids].set(True, mode="drop")
        return History(counts, prompt).pinned()


jax.tree_util.register_dataclass(History, data_fields=["counts", "prompt"], meta_fields=[])


def penalize(logits: Float[Array, "b vocab"], sp, history: History | None) -> Float[Array, "b vocab"]:
    """The fp32 logits after the penalties of `sp` (SamplingArrays) given `history`."""
    logits = logits.astype(jnp.float32)
    if history is None or sp.bias is None:
        return logits
    counts = history.counts
    logits = logits + sp.bias
    early = jnp.sum(counts, axis=-1) < sp.min_tokens
    logits = jnp.where(sp.stop_mask & early[:, None], -jnp.inf, logits)
    r = sp.repetition[:, None]
    seen = history.prompt | (counts > 0)
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    return logits - sp.frequency[:, None] * counts - sp.presence[:, None] * (counts > 0)
