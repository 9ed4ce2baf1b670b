"""Dense SwiGLU MLP: `down(silu(gate(x)) * up(x))` (official names w1, w3, w2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dsv3_jax.layers.linear import as_precision, param, project


class MLP(nnx.Module):
    """SwiGLU feed-forward of width `intermediate`; also the shared experts of a MoE layer."""

    def __init__(self, dim: int, intermediate: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, std: float = 0.006):
        self.precision = as_precision(dtype)
        self.gate_proj = param(rngs, (dim, intermediate), ("embed", "mlp"), dtype=param_dtype, std=std)
        self.up_proj = param(rngs, (dim, intermediate), ("embed", "mlp"), dtype=param_dtype, std=std)
        self.down_proj = param(rngs, (intermediate, dim), ("mlp", "embed"), dtype=param_dtype, std=std)

    def __call__(self, x: Float[Array, "... embed"]) -> Float[Array, "... embed"]:
        g = project(x, self.gate_proj[...], 1, self.precision)
        u = project(x, self.up_proj[...], 1, self.precision)
        return project(jax.nn.silu(g) * u, self.down_proj[...], 1, self.precision)
