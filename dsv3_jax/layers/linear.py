"""Parameters with logical axes, and the one place where matmul precision is chosen.

Every weight is created by `param` with a `logical_axes` tuple (DESIGN principle 3);
`sharding/rules.py` maps those names to mesh axes. Every projection goes through `project`:
operands in the compute dtype (or block-scaled e4m3 under FP8), products accumulated in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.fp8 import QuantizedWeight, fp8_matmul

PRECISIONS = ("fp32", "bf16", "fp8", "fp8-fp32")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Compute dtype of activations and matmul operands, and whether projections run in FP8.

    FP8 covers attention projections, dense MLPs and experts; the embedding, head, gate, norms
    and attention scores stay in `dtype` / fp32 (SPEC section 7)."""

    dtype: object = jnp.float32
    fp8: bool = False

    @classmethod
    def named(cls, name: str) -> "Precision":
        """"fp32", "bf16", "fp8" (bf16 activations, e4m3 matmuls) or "fp8-fp32" (e4m3 matmuls,
        fp32 activations: FP8's rounding without bf16's, to study it or compare meshes)."""
        if name not in PRECISIONS:
            raise ValueError(f"precision {name!r}: allowed {PRECISIONS}")
        fp8 = name.startswith("fp8")
        if fp8 and not fp8_supported():
            warnings.warn(f"precision={name!r} needs a Hopper-class GPU (or CPU emulation): this "
                          f"{jax.devices()[0].device_kind} falls back to bf16", stacklevel=2)
            name, fp8 = "bf16", False
        return cls(jnp.float32 if name in ("fp32", "fp8-fp32") else jnp.bfloat16, fp8)


def fp8_supported() -> bool:
    """CPU (emulated, for tests) and NVIDIA compute capability >= 8.9 run e4m3 dots."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return True
    if dev.platform == "gpu":
        cc = getattr(dev, "compute_capability", "0.0")
        try:
            return tuple(int(v) for v in str(cc).split(".")[:2]) >= (8, 9)
        except ValueError:
            return False
    return dev.platform == "tpu"


def as_precision(dtype_or_precision) -> Precision:
    """Modules accept a dtype (no FP8) or a Precision."""
    if isinstance(dtype_or_precision, Precision):
        return dtype_or_precision
    return Precision(dtype_or_precision, False)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *, dtype,
          std: float) -> nnx.Param:
    """A normal(0, std) weight tagged with its logical axes."""
    assert len(shape) == len(axes), (shape, axes)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes, init_std=std)


def ones_param(shape: tuple[int, ...], axes: tuple[str, ...], *, dtype) -> nnx.Param:
    """A weight initialised to ones (norm gains)."""
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes, init_value=1.0)


def project(x: jax.Array, w, n_in: int, precision: Precision) -> jax.Array:
    """Contract the last `n_in` dims of `x` with the first `n_in` of `w` ([in..., out...]).

    In `precision.dtype` with fp32 accumulation, or through `fp8_matmul` (w may then be a
    QuantizedWeight: `shape` is the parameter's, its values the stored [out..., in...], used
    as the [N, K] matrix without a copy)."""
    in_dims, out_dims = w.shape[:n_in], w.shape[n_in:]
    k, n = math.prod(in_dims), math.prod(out_dims)
    x2 = x.reshape(*x.shape[:-n_in], k).astype(precision.dtype)
    if precision.fp8 or isinstance(w, QuantizedWeight):
        y = fp8_matmul(x2, w.flat() if isinstance(w, QuantizedWeight) else w.reshape(k, n))
    else:
        y = jnp.einsum("...k,kn->...n", x2, w.reshape(k, n).astype(precision.dtype),
                       preferred_element_type=jnp.float32).astype(precision.dtype)
    return y.reshape(*x.shape[:-n_in], *out_dims)
