"""Grouped matmul for routed experts: rows grouped by expert, cost proportional to the rows.

The layout: the (token, expert) rows sorted by expert, each expert's group padded to a
multiple of a tile of `tile` rows, so every tile belongs to exactly one expert. Each tile is
multiplied by its own expert's weight, chunk by chunk, so FLOPs and memory grow with the
number of routed rows (plus at most `tile - 1` padding rows per expert), never with
experts x tokens. `jax.lax.ragged_dot` is not used by default: on XLA:CPU and XLA:GPU it is a
dense emulation whose cost grows with the number of groups (see benchmarks/).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Gathered expert weights per chunk are bounded by this many elements (64 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class GroupedLayout:
    """Where each routed row sits in the tiled, expert-grouped buffer."""

    dest: Int[Array, "rows"]          # row -> position in the buffer (== size: not routed)
    tile_group: Int[Array, "tiles"]   # tile -> expert
    group_sizes: Int[Array, "groups"] # routed rows per expert (unpadded)
    tile: int
    size: int                         # static buffer length (a multiple of tile)


jax.tree_util.register_dataclass(
    GroupedLayout, data_fields=["dest", "tile_group", "group_sizes"], meta_fields=["tile", "size"])


def choose_tile(rows: int, groups: int) -> int:
    """A tile near the mean group size (8..128 rows), bounding padding waste by ~2x."""
    mean = max(1, rows // max(groups, 1))
    tile = 8
    while tile < 128 and tile * 2 <= mean:
        tile *= 2
    return tile


def make_layout(group_ids: Int[Array, "rows"], num_groups: int, *, tile: int | None = None,
                valid: Int[Array, "rows"] | None = None) -> GroupedLayout:
    """Layout for rows tagged with their group (expert) ids; rows with valid=False are skipped."""
    rows = group_ids.shape[0]
    tile = tile or choose_tile(rows, num_groups)
    size = -(-(rows + num_groups * (tile - 1)) // tile) * tile
    if valid is None:
        valid = jnp.ones((rows,), bool)
    gid = jnp.where(valid, group_ids, num_groups)  # invalid rows go to a sentinel group
    counts = jnp.zeros((num_groups + 1,), jnp.int32).at[gid].add(1)
    group_sizes = counts[:num_groups]
    padded = -(-group_sizes // tile) * tile
    padded_start = jnp.cumsum(padded) - padded
    # rank of each row inside its group, in row order (stable)
    order = jnp.argsort(gid, stable=True)
    sorted_gid = gid[order]
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(rows) - starts[sorted_gid]
    rank = jnp.zeros((rows,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    dest = jnp.where(valid, padded_start[jnp.minimum(gid, num_groups - 1)] + rank, size)
    padded_end = jnp.cumsum(padded)
    tile_start = jnp.arange(size // tile) * tile
    tile_group = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), num_groups - 1)
    return GroupedLayout(dest=dest.astype(jnp.int32), tile_group=tile_group.astype(jnp.int32),
                         group_sizes=group_sizes, tile=tile, size=size)


def scatter_rows(x: Float[Array, "rows d"], layout: GroupedLayout) -> Float[Array, "size d"]:
    """Place routed rows into the tiled buffer (padding rows are zero)."""
    buf = jnp.zeros((layout.size, x.shape[-1]), x.dtype)
    return buf.at[layout.dest].set(x, mode="drop")


def gather_rows(buf: Float[Array, "size d"], layout: GroupedLayout) -> Float[Array, "rows d"]:
    """Read each routed row back from the buffer (rows not routed read as zero)."""
    return buf.at[layout.dest].get(mode="fill", fill_value=0)


def grouped_matmul(x: Float[Array, "size k"], w: Float[Array, "groups k n"], layout: GroupedLayout,
                   dtype) -> Float[Array, "size n"]:
    """Tile t of `x` times `w[tile_group[t]]`, in `dtype`, accumulated in fp32."""
    tiles = layout.size // layout.tile
    k, n = w.shape[1], w.shape[2]
    xt = x.reshape(tiles, layout.tile, k).astype(dtype)
    chunk = max(1, min(tiles, _CHUNK_ELEMENTS // max(1, k * n)))

    def one_tile(args):
        xs, g = args
        return jnp.dot(xs, w[g].astype(dtype), preferred_element_type=jnp.float32).astype(dtype)

    out = jax.lax.map(one_tile, (xt, layout.tile_group), batch_size=chunk)
    return out.reshape(layout.size, n)
