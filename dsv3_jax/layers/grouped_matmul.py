"""Grouped matmul for routed experts: rows grouped by expert, cost proportional to the rows.

The layout: the (token, expert) rows sorted by expert, each expert's group padded to a
multiple of a tile of `tile` rows, so every tile belongs to exactly one expert. Each tile is
multiplied by its own expert's weight, a chunk of tiles per iteration of a while loop that
stops at the last tile holding rows (forward and backward, a custom VJP), so FLOPs and memory
grow with the number of routed rows (plus at most `tile - 1` padding rows per expert), never
with experts x tokens. This is "ours" in dsv3_jax/layers/platform_gmm.py: the FP8 path
everywhere, and the CPU kernel where the BLAS one (cpu_gmm.py) cannot be built; pure XLA, so it
runs on every backend (`jax.lax.ragged_dot` on XLA:CPU is a dense emulation whose cost grows
with the number of groups: benchmarks/moe_speed.py, benchmarks/moe_scaling.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dsv3_jax import fp8 as f8
from sharding.mesh import platform as mesh_platform

# Gathered expert weights per loop iteration are bounded by this many elements: 8 MiB in fp32 on
# CPU, 64 MiB on accelerators. On CPU fewer, larger iterations win over cache-sized ones (1 MiB):
# XLA:CPU runs each iteration's ops one after another, and batched dots of ~20 tiles use both
# threads where 2 tiles did not (64-expert step of benchmarks/moe_speed.py: 1.14 vs 1.43 s,
# forward 0.28 vs 0.36 s; 4 and 16 MiB were no faster).
_CHUNK_ELEMENTS = {"cpu": 1 << 21}
_CHUNK_ELEMENTS_DEFAULT = 1 << 24


@dataclasses.dataclass(frozen=True)
class GroupedLayout:
    """Where each routed row sits in the tiled, expert-grouped buffer."""

    dest: Int[Array, "rows"]          # row -> position in the buffer (== size: not routed)
    source: Int[Array, "size"]        # buffer position -> row (== rows: padding), dest inverted
    tile_group: Int[Array, "tiles"]   # tile -> expert
    group_sizes: Int[Array, "groups"] # routed rows per expert (unpadded)
    used_tiles: Int[Array, ""]        # tiles holding rows; the rest of the buffer is padding
    tile: int
    size: int                         # static buffer length (a multiple of tile)


jax.tree_util.register_dataclass(
    GroupedLayout, data_fields=["dest", "source", "tile_group", "group_sizes", "used_tiles"],
    meta_fields=["tile", "size"])


def choose_tile(rows: int, groups: int) -> int:
    """A tile near the mean group size (8..128 rows), bounding padding waste by ~2x."""
    mean = max(1, rows // max(groups, 1))
    tile = 8
    while tile < 128 and tile * 2 <= mean:
        tile *= 2
    return tile


def rank_within_group(groups: Int[Array, "rows"], num_groups: int) -> Int[Array, "rows"]:
    """For each row, how many earlier rows share its group (a stable counting sort)."""
    order = jnp.argsort(groups, stable=True)
    counts = jnp.zeros((num_groups,), jnp.int32).at[groups].add(1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(groups.shape[0], dtype=jnp.int32) - starts[groups[order]]
    return jnp.zeros(groups.shape, jnp.int32).at[order].set(rank_sorted)


def make_layout(group_ids: Int[Array, "rows"], num_groups: int, *, tile: int | None = None,
                valid: Bool[Array, "rows"] | None = None) -> GroupedLayout:
    """Layout for rows tagged with their group (expert) ids; rows with valid=False are skipped."""
    rows = group_ids.shape[0]
    tile = tile or choose_tile(rows, num_groups)
    size = -(-(rows + num_groups * (tile - 1)) // tile) * tile
    if valid is None:
        valid = jnp.ones((rows,), bool)
    gid = jnp.where(valid, group_ids, num_groups)  # invalid rows go to a sentinel group
    counts = jnp.zeros((num_groups + 1,), jnp.int32).at[gid].add(1)
    group_sizes = counts[:num_groups]
    padded = padded_sizes(group_sizes, tile)
    padded_start = jnp.cumsum(padded) - padded
    rank = rank_within_group(gid, num_groups + 1)
    dest = jnp.where(valid, padded_start[jnp.minimum(gid, num_groups - 1)] + rank, size)
    padded_end = jnp.cumsum(padded)
    tile_start = jnp.arange(size // tile) * tile
    tile_group = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), num_groups - 1)
    dest = dest.astype(jnp.int32)
    return GroupedLayout(dest=dest, source=source_rows(dest, size),
                         tile_group=tile_group.astype(jnp.int32),
                         group_sizes=group_sizes, used_tiles=(padded.sum() // tile).astype(jnp.int32),
                         tile=tile, size=size)


def padded_sizes(group_sizes: Int[Array, "groups"], tile: int) -> Int[Array, "groups"]:
    """Rows each group occupies in a layout's buffer: its rows rounded up to a multiple of tile."""
    return (-(-group_sizes // tile) * tile).astype(jnp.int32)


def scatter_rows(x: Float[Array, "rows d"], layout: GroupedLayout) -> Float[Array, "size d"]:
    """Place routed rows into the tiled buffer (padding rows are zero)."""
    return _take_rows(x, layout.source, layout.dest)


def gather_rows(buf: Float[Array, "size d"], layout: GroupedLayout) -> Float[Array, "rows d"]:
    """Read each routed row back from the buffer (rows not routed read as zero)."""
    return _take_rows(buf, layout.dest, layout.source)


def source_rows(dest: Int[Array, "rows"], size: int) -> Int[Array, "size"]:
    """Buffer row -> the routed row placed there (== rows for padding): `dest` inverted."""
    rows = dest.shape[0]
    return jnp.full((size,), rows, jnp.int32).at[dest].set(jnp.arange(rows, dtype=jnp.int32),
                                                          mode="drop")


@jax.custom_vjp
def _take_rows(x, index, inverse):
    """x[index] (zero rows where `index` is out of range). `index` and `inverse` map rows one
    to one both ways, so the transpose is a row gather too, dx = dout[inverse]: no zeroed
    buffer and scatter(-add) in either direction (XLA:CPU's scatters cost more than gathers)."""
    return x.at[index].get(mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse):
    return _take_rows(x, index, inverse), (index, inverse)


def _take_rows_bwd(res, dout):
    index, inverse = res
    return dout.at[inverse].get(mode="fill", fill_value=0), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def grouped_matmul(x: Float[Array, "size k"], w: Float[Array, "groups k n"], layout: GroupedLayout,
                   dtype, fp8: bool = False, out_dtype=None) -> Float[Array, "size n"]:
    """Tile t of `x` times `w[tile_group[t]]`, in `dtype`, accumulated in fp32.

    The products come back in `out_dtype` (default `dtype`); fp32 keeps partial sums exact for
    a caller that adds them across devices (a K split over the tensor axis).

    Tiles are processed in chunks, one per iteration of a while loop that runs to `used_tiles`
    (the static buffer's worst-case padding costs nothing); each chunk gathers its tiles'
    expert weights (bounded by `_CHUNK_ELEMENTS`), forward and backward. With
    `fp8`, every product (forward, dgrad, wgrad) is block-scaled e4m3 (dsv3_jax/fp8.py).
    """
    out_dtype = out_dtype or dtype
    if isinstance(w, f8.QuantizedWeight):  # an FP8 checkpoint's experts, used as stored
        return _gmm(x.astype(dtype), w, layout.tile_group, layout.used_tiles, layout.tile, True,
                    out_dtype)
    # FP8 quantizes the weights from their stored (master) values, not from a bf16 copy.
    x, w = x.astype(dtype), (w if fp8 else w.astype(dtype))
    # Inside shard_map, give x and w the same "varying" axes before the custom VJP: the implicit
    # broadcasts this inserts transpose to the psums that sum dx over tensor shards and dW over
    # batch shards, which a hand-written backward could not know.
    x, w = x + _zeros_varying_like((), x.dtype, w), w + _zeros_varying_like((), w.dtype, x)
    return _gmm(x, w, layout.tile_group, layout.used_tiles, layout.tile, fp8, out_dtype)


def _zeros_varying_like(shape, dtype, *deps):
    """Zeros typed as varying over the same shard_map axes as `deps`, so both `cond` branches
    match under `check_vma` (a select on a constant False: no arithmetic on `deps`, which may
    hold inf)."""
    z = jnp.zeros(shape, dtype)
    for d in deps:
        z = z + jnp.where(False, d.reshape(-1)[0], 0).astype(dtype)
    return z


def _chunk_tiles(tiles: int, per_tile_elements: int) -> int:
    """Tiles per loop iteration: their gathered expert weights stay under the target platform's
    `_CHUNK_ELEMENTS` (the context mesh's devices: AOT compiles for GPU run on CPU)."""
    platform = mesh_platform(jax.sharding.get_abstract_mesh())
    limit = _CHUNK_ELEMENTS.get(platform, _CHUNK_ELEMENTS_DEFAULT)
    return max(1, min(tiles, limit // max(1, per_tile_elements)))


def _chunk_starts(c, chunk: int, tiles: int, used_tiles):
    """First tile of iteration `c` (clamped so the chunk stays in bounds: the last chunk may
    overlap the one before) and a mask of the tiles this iteration owns (not done before, and
    holding rows)."""
    start = jnp.minimum(c * chunk, tiles - chunk)
    index = start + jnp.arange(chunk)
    return start, (index >= c * chunk) & (index < used_tiles)


def _loop_chunks(fn, tile_group, used_tiles, chunk: int, init, *arrays):
    """`carry = fn(carry, start, owned, groups, *array_chunks)` for each chunk of `chunk` tiles
    up to `used_tiles` (a while loop with a dynamic trip count: tiles past the routed rows cost
    nothing). Each array is [tiles, ...]."""
    tiles = tile_group.shape[0]

    def body(c, carry):
        start, owned = _chunk_starts(c, chunk, tiles, used_tiles)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk)  # noqa: E731
        return fn(carry, start, owned, take(tile_group), *map(take, arrays))

    return jax.lax.fori_loop(0, (used_tiles + chunk - 1) // chunk, body, init)


def _tile_products(product, tile_group, used_tiles, chunk: int, out_shape, dtype, w, xt):
    """[tiles, tile, n] per-tile products `product(groups, x_chunk)`; tiles without rows are 0."""
    def fn(out, start, owned, gs, xs):
        return jax.lax.dynamic_update_slice_in_dim(out, product(gs, xs).astype(dtype), start, 0)

    init = _zeros_varying_like(out_shape, dtype, w, xt, tile_group)
    return _loop_chunks(fn, tile_group, used_tiles, chunk, init, xt)


def _tile_forward(w, use_fp8: bool):
    """Per-tile products x_t @ w[g] against each tile's expert weight."""
    if not use_fp8:
        return lambda gs, xs: jnp.einsum("tmk,tkn->tmn", xs, w[gs], preferred_element_type=jnp.float32)
    # [groups, N, K] values: an FP8 checkpoint's experts as stored, or quantized from the master
    qw = w if isinstance(w, f8.QuantizedWeight) else jax.vmap(f8.quantize_weight)(w)
    return lambda gs, xs: jax.vmap(lambda g, x: f8.fp8_forward(x, qw.take(g)))(gs, xs)


def _tile_dgrad(w, use_fp8: bool):
    """Per-tile products dy_t @ w[g]^T."""
    if not use_fp8:
        return lambda gs, dys: jnp.einsum("tmn,tkn->tmk", dys, w[gs], preferred_element_type=jnp.float32)
    # W^T per expert, [groups, K, N] values: quantized from the master weights' own layout (no
    # copy); stored experts' blocks transposed (a copy, only in a backward pass through them)
    wt = (w.transpose() if isinstance(w, f8.QuantizedWeight)
          else jax.vmap(f8.quantize_weight)(jnp.swapaxes(w, 1, 2)))
    return lambda gs, dys: jax.vmap(lambda g, dy: f8.fp8_dgrad(dy, wt.take(g)))(gs, dys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm(x, w, tile_group, used_tiles, tile, use_fp8, out_dtype):
    tiles, (k, n) = x.shape[0] // tile, w.shape[1:]
    y = _tile_products(_tile_forward(w, use_fp8), tile_group, used_tiles,
                       _chunk_tiles(tiles, k * n), (tiles, tile, n), out_dtype, _array_of(w),
                       x.reshape(tiles, tile, k))
    return y.reshape(x.shape[0], n)


def _array_of(w):
    return w.q if isinstance(w, f8.QuantizedWeight) else w


def _gmm_fwd(x, w, tile_group, used_tiles, tile, use_fp8, out_dtype):
    return (_gmm(x, w, tile_group, used_tiles, tile, use_fp8, out_dtype),
            (x, w, tile_group, used_tiles))


def _gmm_bwd(tile, use_fp8, out_dtype, res, dy):
    x, w, tile_group, used_tiles = res
    tiles, (k, n) = x.shape[0] // tile, w.shape[1:]
    xt, dyt = x.reshape(tiles, tile, k), dy.reshape(tiles, tile, n).astype(x.dtype)
    chunk = _chunk_tiles(tiles, k * n)
    dx = _tile_products(_tile_dgrad(w, use_fp8), tile_group, used_tiles, chunk, (tiles, tile, k),
                        x.dtype, _array_of(w), dyt).reshape(x.shape)
    if isinstance(w, f8.QuantizedWeight):  # stored FP8 weights are frozen
        return dx, jax.tree.map(jnp.zeros_like, w), None, None
    dw = _weight_grad(xt, dyt, tile_group, used_tiles, w.shape[0], chunk, use_fp8)
    return dx, dw.astype(w.dtype), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tile_weight_grads(a: Float[Array, "tiles rows k"], b: Float[Array, "tiles rows n"]
                      ) -> Float[Array, "tiles k n"]:
    """a_t^T b_t for each tile t, accumulated in fp32. a^T is written out first (the optimization
    barrier keeps XLA from folding the transpose back into the dot): XLA:CPU runs a dot whose
    lhs contracts its rows as a slower generic contraction, and the row-major batched GEMM
    instead (the fused expert FFN's forward + backward at 64 experts: 56-60 vs 65-72 ms)."""
    a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, 1, 2))
    return jnp.einsum("tkm,tmn->tkn", a_t, b, preferred_element_type=jnp.float32)


def _weight_grad(xt, dyt, tile_group, used_tiles, groups: int, chunk: int, use_fp8: bool = False):
    """dW[g] = sum over g's tiles of x_t^T dy_t, accumulated chunk by chunk in fp32."""
    _, _, k = xt.shape
    n = dyt.shape[-1]

    def fn(dw, start, owned, gs, xs, dys):
        if use_fp8:  # x^T dy with each tile's rows as one token tile
            per_tile = jax.vmap(lambda a, b: f8.fp8_wgrad(a, b, a.shape[0]))(xs, dys)
        else:
            per_tile = tile_weight_grads(xs, dys)
        per_tile = jnp.where(owned[:, None, None], per_tile, 0)
        return dw.at[gs].add(per_tile, indices_are_sorted=True)

    dw0 = _zeros_varying_like((groups, k, n), jnp.float32, xt, dyt, tile_group)
    return _loop_chunks(fn, tile_group, used_tiles, chunk, dw0, xt, dyt)
