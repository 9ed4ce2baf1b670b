"""Multi-head latent attention (SPEC section 3): training / prefill path and absorbed decode.

Query: `q = q_b_proj(RMSNorm(q_a_proj(x)))` (or `q_proj(x)` when q_lora_rank is 0), per head
`[nope | rope]`. Keys and values come from one compressed latent: `kv_a_proj_with_mqa(x)` gives
`c_kv` (normed) and ONE roped key part `k_pe` shared by all heads; `kv_b_proj` expands `c_kv`
into per-head `[k_nope | v]`. Scores and softmax in fp32.

Serving (`MLA.decode`) never expands the cached prefix: W_UK (the k_nope rows of kv_b_proj) is
folded into the query and W_UV applied after attending over the latent, so the cache holds only
`c_kv` and `k_pe` (kv_lora_rank + qk_rope_head_dim values per token per layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import QuantizedWeight
from dsv3_jax.layers.attention import attention
from dsv3_jax.layers.linear import as_precision, param, project
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import apply_rope


class MLA(nnx.Module):
    """Multi-head latent attention with decoupled RoPE."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.cfg = cfg
        self.precision = as_precision(dtype)
        self.dtype = self.precision.dtype
        D, H = cfg.hidden_size, cfg.num_attention_heads
        std = cfg.initializer_range
        if cfg.q_lora_rank:
            self.q_a_proj = param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"),
                                  dtype=param_dtype, std=std)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps, axis_name="q_lora",
                                         param_dtype=param_dtype)
            self.q_b_proj = param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim),
                                  ("q_lora", "heads", "head_dim"), dtype=param_dtype, std=std)
        else:
            self.q_proj = param(rngs, (D, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"),
                                dtype=param_dtype, std=std)
        self.kv_a_proj_with_mqa = param(rngs, (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                                        ("embed", "kv_lora"), dtype=param_dtype, std=std)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps, axis_name="kv_lora",
                                      param_dtype=param_dtype)
        self.kv_b_proj = param(rngs, (cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                               ("kv_lora", "heads", "head_dim"), dtype=param_dtype, std=std)
        self.o_proj = param(rngs, (H, cfg.v_head_dim, D), ("heads", "head_dim", "embed"),
                            dtype=param_dtype, std=std)
        self.softmax_scale = softmax_scale(cfg)

    def query(self, x: Float[Array, "batch seq embed"], cos, sin
              ) -> tuple[Float[Array, "batch seq heads nope"], Float[Array, "batch seq heads rope"]]:
        """Per-head query split into its position-free part and its roped part."""
        if self.cfg.q_lora_rank:
            c_q = self.q_a_layernorm(project(x, self.q_a_proj[...], 1, self.precision))
            q = project(c_q, self.q_b_proj[...], 1, self.precision)
        else:
            q = project(x, self.q_proj[...], 1, self.precision)
        nope = self.cfg.qk_nope_head_dim
        return q[..., :nope], apply_rope(q[..., nope:], cos, sin)

    def latent(self, x: Float[Array, "batch seq embed"], cos, sin
               ) -> tuple[Float[Array, "batch seq kv_lora"], Float[Array, "batch seq rope"]]:
        """The cacheable part: normed latent `c_kv` and the roped shared key `k_pe`."""
        kv = project(x, self.kv_a_proj_with_mqa[...], 1, self.precision)
        r = self.cfg.kv_lora_rank
        return self.kv_a_layernorm(kv[..., :r]), apply_rope(kv[..., r:], cos, sin)

    def __call__(self, x: Float[Array, "batch seq embed"], cos: Float[Array, "batch seq half"],
                 sin: Float[Array, "batch seq half"],
                 segment_ids: Int[Array, "batch seq"] | None = None) -> Float[Array, "batch seq embed"]:
        """Causal self-attention over the sequence (the training / prefill path).

        `segment_ids`: packed documents; a token attends only to earlier tokens of its own
        segment (None: one segment per row)."""
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        k_nope, v = self.expand(c_kv)
        o = attention(q_nope, q_pe, k_nope, k_pe, v, scale=self.softmax_scale,
                      q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        return project(o, self.o_proj[...], 2, self.precision)

    def prefill(self, x: Float[Array, "batch seq embed"], cos: Float[Array, "batch seq half"],
                sin: Float[Array, "batch seq half"], cache: LatentCache | None,
                start: Int[Array, "batch"] | None) -> tuple[Float[Array, "batch seq embed"], LatentCache]:
        """Expanded-form attention of new tokens at `start[b] + i` over the cached prefix
        `[0, start)` and themselves: `decode`'s function, computed as in training (blockwise,
        keys and values expanded from the latent), the cheaper form for many new tokens.

        `cache` is a window of each row's latent cache at least `start + seq` long (None:
        nothing before the tokens). Returns the output and the new tokens' cache entries."""
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is None:
            keys, offset, kv_len = (c_kv, k_pe), None, None
        else:  # the chunk's entries written after the prefix, as the engine will store them
            put = jax.vmap(lambda c, e, p: jax.lax.dynamic_update_slice_in_dim(c, e.astype(c.dtype), p, 0))
            keys = put(cache.c_kv, c_kv, start), put(cache.k_pe, k_pe, start)
            offset, kv_len = start, start + x.shape[1]
        k_nope, v = self.expand(keys[0].astype(self.dtype))
        o = attention(q_nope, q_pe, k_nope, keys[1].astype(self.dtype), v, scale=self.softmax_scale,
                      q_offset=offset, kv_len=kv_len)
        return project(o, self.o_proj[...], 2, self.precision), LatentCache(c_kv, k_pe)

    def expand(self, c_kv: Float[Array, "batch time kv_lora"]
               ) -> tuple[Float[Array, "batch time heads nope"], Float[Array, "batch time heads v"]]:
        """Per-head keys' position-free part and values from the latent (kv_b_proj)."""
        kv = project(c_kv, self.kv_b_proj[...], 1, self.precision)
        return kv[..., :self.cfg.qk_nope_head_dim], kv[..., self.cfg.qk_nope_head_dim:]

    def absorbed_weights(self) -> tuple[Float[Array, "kv_lora heads nope"], Float[Array, "kv_lora heads v"]]:
        """(W_UK, W_UV): kv_b_proj split per head into its key and value parts, compute dtype."""
        w = self.kv_b_proj[...]
        nope = self.cfg.qk_nope_head_dim
        if isinstance(w, QuantizedWeight):  # an FP8 checkpoint's weight: the absorbed products
            # are not projections of activations, run them in bf16
            return w.dequantize_parts((nope, self.cfg.v_head_dim), self.dtype)
        w = w.astype(self.dtype)
        return w[..., :nope], w[..., nope:]

    def decode(self, x: Float[Array, "batch seq embed"], cos: Float[Array, "batch seq half"],
               sin: Float[Array, "batch seq half"], cache: LatentCache | None,
               start: Int[Array, "batch"]) -> tuple[Float[Array, "batch seq embed"], LatentCache]:
        """Absorbed attention of new tokens over the cached prefix `[0, start)` and themselves.

        Row b's new tokens sit at positions `start[b] + i`; cache entries at `j >= start[b]` are
        stale or empty and masked out. Returns the output and the new tokens' cache entries."""
        f32 = jnp.float32
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        w_uk, w_uv = self.absorbed_weights()
        q_lat = jnp.einsum("bshd,rhd->bshr", q_nope, w_uk, preferred_element_type=f32).astype(self.dtype)

        def scores(ckv, kpe):
            return (jnp.einsum("bshr,btr->bhst", q_lat, ckv, preferred_element_type=f32)
                    + jnp.einsum("bshd,btd->bhst", q_pe, kpe, preferred_element_type=f32)
                    ) * self.softmax_scale

        s = x.shape[1]
        lo = jnp.finfo(f32).min
        parts = [jnp.where(causal_mask(s)[None, None], scores(c_kv, k_pe), lo)]
        if cache is not None:
            valid = jnp.arange(cache.c_kv.shape[1])[None, :] < start[:, None]  # [batch, time]
            parts.insert(0, jnp.where(valid[:, None, None, :], scores(cache.c_kv, cache.k_pe), lo))
        probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1).astype(self.dtype)
        # (XLA:CPU has no bf16 x bf16 -> f32 kernel for the "bshr" output order of this dot)
        o_lat = jnp.einsum("bhst,btr->bhsr", probs[..., -s:], c_kv, preferred_element_type=f32)
        if cache is not None:
            o_lat = o_lat + jnp.einsum("bhst,btr->bhsr", probs[..., :-s], cache.c_kv,
                                       preferred_element_type=f32)
        o = jnp.einsum("bhsr,rhd->bshd", o_lat.astype(self.dtype), w_uv,
                       preferred_element_type=f32).astype(self.dtype)
        return project(o, self.o_proj[...], 2, self.precision), LatentCache(c_kv, k_pe)


@dataclasses.dataclass
class LatentCache:
    """What MLA caches per token: the normed latent and the roped shared key (SPEC section 3)."""

    c_kv: Float[Array, "*layers batch time kv_lora"]
    k_pe: Float[Array, "*layers batch time rope"]


jax.tree_util.register_dataclass(LatentCache, data_fields=["c_kv", "k_pe"], meta_fields=[])


def softmax_scale(cfg: ModelConfig) -> float:
    """`qk_head_dim ** -0.5 * mscale ** 2`, mscale from YaRN (V3: 0.13523378)."""
    return cfg.qk_head_dim ** -0.5 * cfg.yarn_mscale() ** 2


def causal_mask(seq: int) -> jax.Array:
    """[seq, seq] boolean mask, True where query i may attend to key j <= i."""
    return jnp.tril(jnp.ones((seq, seq), bool))
