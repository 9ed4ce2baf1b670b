"""RMSNorm (SPEC section 2): fp32 statistics, cast back, then the gain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dsv3_jax.layers.linear import ones_param


class RMSNorm(nnx.Module):
    """`weight * (x * rsqrt(mean(x^2) + eps))`, the normalisation done in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed",
                 param_dtype=jnp.float32):
        self.eps = eps
        self.weight = ones_param((dim,), (axis_name,), dtype=param_dtype)

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)
