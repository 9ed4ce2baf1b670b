"""The one table from the model's logical axes to mesh axes (DESIGN principle 3).

Parameters carry `logical_axes` metadata (dsv3_jax/layers/linear.py); activations are pinned
at layer boundaries with `constrain(x, ("batch", "seq", None))`. Swapping a parallelism layout
is a change to `RULES` or to the mesh spec, never to a layer.

Resolution per array: each logical axis maps to a tuple of mesh axes; a mesh axis is used at
most once per array (first dimension wins), axes of size 1 are dropped, and axes whose product
does not divide the dimension are dropped from the right until it does.
"""

from __future__ import annotations

import contextlib
import contextvars
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


def logical_to_spec(axes, shape, mesh) -> P:
    """PartitionSpec for an array of `shape` whose dims carry the logical `axes`."""
    rules = _active_rules.get()
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in sharding.rules.RULES")
        mesh_axes = [a for a in rules[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        while mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return P(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where a parameter (or other variable) lives, from its `logical_axes` metadata."""
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh))


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


def batch_axes(mesh, *, include_trivial: bool = False) -> tuple[str, ...]:
    """The mesh axes that split the batch (by default only those of size > 1)."""
    return tuple(a for a in _active_rules.get()["batch"]
                 if a in mesh.shape and (include_trivial or mesh.shape[a] > 1))
