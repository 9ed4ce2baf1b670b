"""Rotary position embedding with YaRN scaling (SPEC section 4).

DeepSeek checkpoints pair adjacent dims (2i, 2i+1) as one complex number; we rotate those
pairs directly, which gives the same dot products as transformers' de-interleaved form.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [rope_dim / 2] (fp32) and the cos/sin scale factor."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    freq_extra = (1.0 / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if not rs:
        return freq_extra, 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def corr(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    freq_inter = (1.0 / (factor * pos_freqs)).astype(np.float32)
    inv_freq = freq_inter * ramp + freq_extra * (1 - ramp)

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _get_mscale(factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(
    cfg: ModelConfig, positions: Int[Array, "batch seq"]
) -> tuple[Float[Array, "batch seq half"], Float[Array, "batch seq half"]]:
    """cos and sin of the rotation angles `pos * inv_freq`, in fp32, YaRN-scaled."""
    inv_freq, scale = yarn_inv_freq(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(
    x: Float[Array, "batch seq *heads dim"],
    cos: Float[Array, "batch seq half"],
    sin: Float[Array, "batch seq half"],
) -> Float[Array, "batch seq *heads dim"]:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of pair i; computed in fp32."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
