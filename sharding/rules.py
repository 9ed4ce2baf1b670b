"""The one table from the model's logical axes to mesh axes (DESIGN principle 3).

Parameters carry `logical_axes` metadata (dsv3_jax/layers/linear.py); activations are pinned
at layer boundaries with `constrain(x, ("batch", "seq", None))`. Swapping a parallelism layout
is a change to `RULES` or to the mesh spec, never to a layer.

Resolution per array: each logical axis maps to a tuple of mesh axes; a mesh axis is used at
most once per array (first dimension wins), axes of size 1 are dropped, and axes whose product
does not divide the dimension are dropped from the right until it does.

Block-quantized weights (FP8 `QuantizedWeight`: e4m3 values + one scale per block) follow the
same table with one more condition: a shard must hold whole blocks, so each device's values and
scales cover the same blocks (`quantized_specs`). An axis that would cut blocks is dropped like
one that does not divide; where a shard_map needs the split (`REQUIRED_SPLITS`), that is an
error naming the weight, the mesh axis and the block size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp", "expert", "pipeline"),  # pipeline: outside the stages (pipeline.py)
    "seq": (),
    # parameters
    "layers": ("pipeline",),          # each pipeline stage holds its layers (sharding/pipeline.py)
    "vocab": ("tensor",),
    # FSDP; the expert axis doubles as FSDP for dense weights, and the pipeline axis for what
    # is not split by layer (embedding, head, MTP, a stack whose length it does not divide,
    # which sharding/pipeline.py reshards to its stages each step)
    "embed": ("pipeline", "fsdp", "expert"),
    "embed_concat": ("pipeline", "fsdp", "expert"),
    "heads": ("tensor",),
    "head_dim": (),
    # FSDP too: q_b_proj / kv_b_proj have no "embed" dimension, and without a tensor axis they
    # were held whole by every device (671B: 6.4 GB per 29-layer stage in fp32, SCALE.md)
    "q_lora": ("pipeline", "fsdp", "expert"),
    "kv_lora": ("pipeline", "fsdp", "expert"),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
    "router": (),
}

_active_rules = contextvars.ContextVar("dsv3_rules", default=RULES)


@contextlib.contextmanager
def use_rules(rules: dict[str, tuple[str, ...]]):
    """Use another logical -> mesh table inside this block."""
    token = _active_rules.set(rules)
    try:
        yield
    finally:
        _active_rules.reset(token)


def active_rules() -> dict[str, tuple[str, ...]]:
    """The logical -> mesh table in use here (`RULES` unless inside `use_rules`)."""
    return _active_rules.get()


def _splits(dim: int, parts: int, unit: int) -> bool:
    """Whether `dim` splits into `parts` equal shards of a whole number of `unit`s."""
    return dim % parts == 0 and (dim // parts) % unit == 0


def logical_to_spec(axes, shape, mesh, units=None) -> P:
    """PartitionSpec for an array of `shape` whose dims carry the logical `axes`.

    `units` (one per dim, default 1): a dim is only split into shards that are whole multiples
    of its unit (block-quantized weights: whole blocks)."""
    rules = _active_rules.get()
    units = units or (1,) * len(shape)
    used: set[str] = set()
    spec = []
    for name, dim, unit in zip(axes, shape, units):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in sharding.rules.RULES")
        mesh_axes = [a for a in rules[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        while mesh_axes and not _splits(dim, math.prod(mesh.shape[a] for a in mesh_axes), unit):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return P(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh):
    """Where a parameter (or other variable) lives, from its `logical_axes` metadata.

    A variable holding a `QuantizedWeight` gets a `QuantizedWeight` of two NamedShardings
    (values, scales; see `quantized_specs`)."""
    from dsv3_jax.fp8 import QuantizedWeight  # here: the dsv3_jax package imports this module

    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    value = var.get_value()
    if isinstance(value, QuantizedWeight):
        q_spec, s_spec = quantized_specs(axes, value.shape, value.scale.shape, value.block, mesh,
                                         n_in=value.n_in)
        return dataclasses.replace(value, q=NamedSharding(mesh, q_spec),
                                   scale=NamedSharding(mesh, s_spec))
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh))


class BlockAlignmentError(ValueError):
    """A block-quantized weight cannot be split where it must be without cutting its blocks."""


# Logical axes a shard_map takes split exactly as this table says: the expert-parallel
# dispatcher (sharding/expert_parallel.py) runs each device's experts on its own [experts,
# embed, expert_mlp / tensor] slice and sums the tensor shards' partial products. Replicating
# such a dim instead would be wrong, so a block-quantized weight that cannot be split there at
# block boundaries is an error (others fall back to fewer mesh axes, like any dim that does not
# divide).
REQUIRED_SPLITS = ("experts", "expert_mlp")


def _block_units(shape, lead: int, n_in: int, block) -> list[int]:
    """Per dim of the parameter [lead..., in..., out...], the shard granularity that keeps whole
    blocks (`block` = (N rows, K columns)): 1 for leading dims; for the first dim of the input
    (output) group, what makes (dim / parts) * (the group's other dims) a multiple of the
    block; the group's other dims cannot be split into contiguous blocks at all (a unit larger
    than the dim)."""
    units = [1] * lead
    for dims, b in ((shape[lead:lead + n_in], block[1]), (shape[lead + n_in:], block[0])):
        rest = math.prod(dims[1:])
        units.append(b // math.gcd(b, rest))
        units += [d + 1 for d in dims[1:]]
    return units


def quantized_specs(axes, shape, scale_shape, block, mesh, *, n_in: int,
                    name: str = "") -> tuple[P, P]:
    """(values, scales) PartitionSpecs of a block-quantized weight by the logical-axis rules.

    `axes` and `shape` are the parameter's [lead..., in..., out...] (`n_in` input dims; lead:
    layer / expert stacks); the values are stored [lead..., out..., in...] and the scales
    [lead..., ceil(N / block[0]), ceil(K / block[1])] (dsv3_jax/fp8.py QuantizedWeight). The
    split is the table's for the parameter (the same mesh axes on the same logical dims as an
    unquantized weight, where blocks allow), restricted to whole blocks, then permuted to the
    stored order; the scales take the same mesh axes on the leading dims and, on their N (K)
    dim, those of the first output (input) dim, so every device's values and scales cover the
    same blocks. Raises BlockAlignmentError (naming `name`) when a dim in `REQUIRED_SPLITS`
    cannot be split at block boundaries."""
    from dsv3_jax.fp8 import stored_order
    lead = len(scale_shape) - 2
    units = _block_units(shape, lead, n_in, block)
    spec = logical_to_spec(axes, shape, mesh, units)
    _check_required(axes, shape, units, spec, mesh, block, lead, n_in, name)
    parts = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*stored_order(parts, lead, n_in)), P(*parts[:lead], parts[lead + n_in], parts[lead])


def _check_required(axes, shape, units, spec, mesh, block, lead, n_in, name) -> None:
    plain = logical_to_spec(axes, shape, mesh)
    for i, (axis, dim, unit) in enumerate(zip(axes, shape, units)):
        want = plain[i] if i < len(plain) else None
        got = spec[i] if i < len(spec) else None
        if axis not in REQUIRED_SPLITS or want == got:
            continue
        mesh_axes = (want,) if isinstance(want, str) else tuple(want)
        parts = math.prod(mesh.shape[a] for a in mesh_axes)
        b = block[1] if i < lead + n_in else block[0]
        ok = [1] + [m for m in range(2, dim + 1) if _splits(dim, m, unit)]  # 1: not split
        raise BlockAlignmentError(
            f"{name or 'a block-quantized weight'}: its {axis} dimension of {dim} split over mesh "
            f"axis {'x'.join(mesh_axes)} ({parts}) gives shards of {dim // parts}, which cut its "
            f"FP8 blocks of {b} (each device's values must cover whole blocks of its scales); "
            f"the expert-parallel MoE needs this split. Sizes that would work for "
            f"{'x'.join(mesh_axes)}: {', '.join(map(str, ok))}; or load with precision='bf16' "
            "(dequantized)")


def state_shardings(state: nnx.State, mesh: Mesh):
    """The NamedSharding of every variable in `state` (same tree structure)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes) -> jax.Array:
    """Pin an activation's layout by logical axes; a no-op outside a mesh (`jax.set_mesh`).

    Unlike parameters, activations do not fall back to replication: a dimension the mesh
    cannot split (a batch of 6 on 8 data shards) is an error naming the dimension.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = _active_rules.get()
    for name, dim in zip(axes, x.shape):
        want = [a for a in rules.get(name, ()) if a in mesh.shape and mesh.shape[a] > 1]
        n = math.prod(mesh.shape[a] for a in want)
        if name is not None and dim % n:
            raise ValueError(f"the {name} dimension of size {dim} is not divisible by {n}, the "
                             f"product of the mesh axes {'x'.join(want)} that split it")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def unsplit(x: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """Pin dims `dims` of `x` unsplit (every device holds them whole), the other dims' placement
    left to the compiler; a no-op outside a mesh and inside shard_map. For an operand a loop
    slices along such a dim (the FP8 product's K-blocks): XLA then gathers it once, before the
    loop, where a split dim made it gather the whole operand again for every slice."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return x
    spec = [P.UNCONSTRAINED] * x.ndim
    for d in dims:
        spec[d] = None
    return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_axes(mesh, *, include_trivial: bool = False) -> tuple[str, ...]:
    """The mesh axes that split the batch (by default only those of size > 1)."""
    return tuple(a for a in _active_rules.get()["batch"]
                 if a in mesh.shape and (include_trivial or mesh.shape[a] > 1))
