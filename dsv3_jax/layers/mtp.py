"""Multi-token prediction module (SPEC section 6).

Module k predicts token i+k+1 from `h' = eh_proj([enorm(Emb(t_{i+k})), hnorm(h_i)])`
(embedding first, as in the checkpoint) run through one full transformer block, then
`shared_head.norm` and the main model's output head. Embedding and head are shared with the
main model and passed in by it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.linear import as_precision, param, project
from dsv3_jax.layers.norm import RMSNorm


class MTP(nnx.Module):
    """One MTP depth: combine the previous depth's hidden state with the next token's embedding."""

    def __init__(self, cfg: ModelConfig, block: nnx.Module, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        D = cfg.hidden_size
        self.precision = as_precision(dtype)
        self.enorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.hnorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.eh_proj = param(rngs, (2 * D, D), ("embed_concat", "embed"), dtype=param_dtype,
                             std=cfg.initializer_range)
        self.block = block
        self.shared_head_norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, h_prev: Float[Array, "batch seq embed"], emb_next: Float[Array, "batch seq embed"],
                 cos, sin, segment_ids: Int[Array, "batch seq"] | None = None
                 ) -> tuple[Float[Array, "batch seq embed"], Float[Array, "batch seq embed"], dict]:
        """Returns (block output for the next depth, normed state for the head, block aux).

        `segment_ids`: those of `h_prev`'s positions (packed documents): the block attends
        within a document. A state whose next token lies in another document mixes the two;
        only positions at most k before a document's end are such, and the loss masks their
        predictions (dsv3_jax/train/losses.py), so no kept prediction reads one."""
        h, aux = self.block(self.combine(h_prev, emb_next), cos, sin, segment_ids)
        return h, self.shared_head_norm(h), aux

    def combine(self, h_prev: Float[Array, "batch seq embed"], emb_next: Float[Array, "batch seq embed"]
                ) -> Float[Array, "batch seq embed"]:
        """`eh_proj([enorm(emb_next), hnorm(h_prev)])`, the block's input."""
        h = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1)
        return project(h, self.eh_proj[...], 1, self.precision)

    def decode(self, h_prev: Float[Array, "batch seq embed"], emb_next: Float[Array, "batch seq embed"],
               cos, sin, cache, start: Int[Array, "batch"], *, prefill: bool = False
               ) -> tuple[Float[Array, "batch seq embed"], Float[Array, "batch seq embed"], object]:
        """Cached counterpart of `__call__` (serving): (block output, normed state, new cache
        entries); `prefill` as in `Block.decode`."""
        h, entries = self.block.decode(self.combine(h_prev, emb_next), cos, sin, cache, start,
                                       prefill=prefill)
        return h, self.shared_head_norm(h), entries
