"""Parameters with logical axes, and the one place where matmul dtypes are chosen.

Every weight is created by `param` with a `logical_axes` tuple (DESIGN principle 3);
`sharding/rules.py` maps those names to mesh axes. Every projection goes through `einsum`:
operands cast to the compute dtype, products accumulated in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *, dtype,
          std: float) -> nnx.Param:
    """A normal(0, std) weight tagged with its logical axes."""
    assert len(shape) == len(axes), (shape, axes)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes, init_std=std)


def ones_param(shape: tuple[int, ...], axes: tuple[str, ...], *, dtype) -> nnx.Param:
    """A weight initialised to ones (norm gains)."""
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes, init_value=1.0)


def einsum(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in `dtype`, accumulated in fp32, returned in `dtype`."""
    out = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)
