"""The serving engine's latent cache: preallocated slots, sharded by logical axes, written in place.

One `DecodeCache` holds every layer's `LatentCache` for `max_batch` slots and `max_seq_len`
positions: `c_kv` [layers, batch, time, kv_lora_rank] and `k_pe` [layers, batch, time,
qk_rope_head_dim] per scanned stack, and the same without the layers axis for the MTP block.
Slots are split over the mesh's batch axes and replicated over tensor (the latent is shared by
all heads, so a tensor split of it would only move the all-gather into every step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jaxtyping import Array, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.mla import LatentCache
from dsv3_jax.model import DecodeCache, Transformer
from sharding.rules import constrain, logical_to_spec

STACK_AXES = ("layers", "batch", "seq", None)  # c_kv / k_pe of a scanned stack
MTP_AXES = ("batch", "seq", None)


def bytes_per_token_per_layer(cfg: ModelConfig, dtype) -> int:
    """`(kv_lora_rank + qk_rope_head_dim) * itemsize`: 1,152 bytes for V3 in bf16."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * np.dtype(dtype).itemsize


def _sharding(shape: tuple[int, ...], axes: tuple, mesh):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def zeros(shape: tuple[int, ...], dtype, axes: tuple, mesh=None) -> jax.Array:
    """Zeros placed by logical axes on `mesh` (or on the default device), created on the device.

    Always committed to a device: a jitted step's outputs are, and an uncommitted first input
    would make the first call's compiled program miss the cache on every later call."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=_sharding(shape, axes, mesh))()


def put(value: np.ndarray, axes: tuple, mesh=None) -> jax.Array:
    """A host array placed like `zeros` (e.g. per-slot step inputs, laid out as the step's
    outputs that replace them are)."""
    return jax.device_put(value, _sharding(np.shape(value), axes, mesh))


def _latent(lead: tuple[int, ...], batch: int, time: int, cfg: ModelConfig, dtype, mesh) -> LatentCache:
    axes = STACK_AXES if lead else MTP_AXES
    return LatentCache(zeros((*lead, batch, time, cfg.kv_lora_rank), dtype, axes, mesh),
                       zeros((*lead, batch, time, cfg.qk_rope_head_dim), dtype, axes, mesh))


def allocate(model: Transformer, batch: int, time: int, *, mtp: bool, mesh=None) -> DecodeCache:
    """Zeroed cache for `batch` slots of `time` positions in the model's compute dtype."""
    cfg, dtype = model.cfg, model.dtype
    return DecodeCache(
        dense=_latent((cfg.num_dense_layers,), batch, time, cfg, dtype, mesh) if cfg.num_dense_layers else None,
        moe=_latent((cfg.num_moe_layers,), batch, time, cfg, dtype, mesh) if cfg.num_moe_layers else None,
        mtp=_latent((), batch, time, cfg, dtype, mesh) if mtp else None)


def _write_one(cache: LatentCache, entries: LatentCache, rows, positions, stacked: bool) -> LatentCache:
    def put(c, e):
        # rows [b, 1] and positions [b, s] index (batch, time); out-of-range ones are dropped
        index = (slice(None),) * stacked + (rows[:, None], positions)
        c = c.at[index].set(e.astype(c.dtype), mode="drop")
        return constrain(c, STACK_AXES if stacked else MTP_AXES)

    return LatentCache(put(cache.c_kv, entries.c_kv), put(cache.k_pe, entries.k_pe))


def write(cache: DecodeCache, entries: DecodeCache, rows: Int[Array, "b"],
          positions: Int[Array, "b s"]) -> DecodeCache:
    """Store new tokens' entries ([..., b, s, width]) at slot `rows[i]`, time `positions[i]`.

    Rows or positions out of range (a padding row's slot == max_batch) are dropped. Under jit
    with the cache donated this updates the buffers in place."""
    out = {}
    for name, stacked in (("dense", True), ("moe", True), ("mtp", False)):
        c, e = getattr(cache, name), getattr(entries, name)
        out[name] = c if c is None or e is None else _write_one(c, e, rows, positions, stacked)
    return DecodeCache(**out)


def copy_prefix(cache: DecodeCache, src: Int[Array, ""], dst: Int[Array, ""],
                length: Int[Array, ""]) -> DecodeCache:
    """Slot `dst` gets slot `src`'s entries at positions [0, length) (prefix caching: a prompt
    that starts like one already in the cache reuses its rows). Donate `cache` to do it in place."""
    def one(a, stacked: bool):
        keep = (jnp.arange(a.shape[-2]) < length)[:, None]
        row = jnp.where(keep, a[..., src, :, :], a[..., dst, :, :])
        return constrain(a.at[..., dst, :, :].set(row), STACK_AXES if stacked else MTP_AXES)

    out = {}
    for name, stacked in (("dense", True), ("moe", True), ("mtp", False)):
        c = getattr(cache, name)
        out[name] = None if c is None else LatentCache(one(c.c_kv, stacked), one(c.k_pe, stacked))
    return DecodeCache(**out)
