"""The planner's state bytes: every variable's shard per device, as sharding/rules.py lays it out.

Formulas in dsv3_jax/plan.py's docstring ("State" and "Serving the official FP8 checkpoint").
Shapes come from the abstract model (`abstract_model`, nothing allocated); which weights are
FP8 as stored comes from the checkpoint key map (dsv3_jax/weights.py), and their block-aligned
layout from `sharding.rules.quantized_specs`, the function load_hf places them with.
"""

from __future__ import annotations

import functools
import json
import math
import types
from typing import Any, NamedTuple

import jax.numpy as jnp

from dsv3_jax.config import ModelConfig

# dims split for storage only, gathered for compute (sharding/rules.py maps them to FSDP axes)
FSDP_AXES = ("embed", "embed_concat", "q_lora", "kv_lora")
# FP8 weights of the official checkpoint: every linear weight except these (and the embedding,
# norms and routing bias, which are not linear weights)
NOT_FP8 = (("lm_head",), ("mlp", "gate", "weight"))


class Var(NamedTuple):
    path: tuple            # as in nnx.to_flat_state(nnx.state(model)) (load_hf's paths)
    axes: tuple            # logical axes
    shape: tuple
    is_param: bool
    fixed: Any             # a dtype other than the parameters' (the fp32 routing bias) or None


class Fp8Layout(NamedTuple):
    shape: tuple           # the values' [lead..., out..., in...] (the checkpoint's orientation)
    scale_shape: tuple     # [lead..., ceil(N / block[0]), ceil(K / block[1])]
    block: tuple           # (N rows, K columns): the checkpoint's weight_block_size
    n_in: int              # input dims after the leading (layer, expert) ones


def variables(cfg: ModelConfig) -> tuple[Var, ...]:
    """Every variable of the model: shapes only."""
    return _variables_of(json.dumps(cfg.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _variables_of(cfg_json: str) -> tuple:
    from flax import nnx

    from dsv3_jax.model import abstract_model
    model = abstract_model(ModelConfig.from_dict(json.loads(cfg_json)), param_dtype=jnp.bfloat16)
    out = []
    for path, v in nnx.to_flat_state(nnx.state(model)):
        axes = v.get_metadata().get("logical_axes") or (None,) * len(v.shape)
        fixed = None if v.dtype == jnp.bfloat16 else v.dtype
        out.append(Var(tuple(path), tuple(axes), tuple(v.shape), isinstance(v, nnx.Param), fixed))
    return tuple(out)


def fp8_layouts(cfg: ModelConfig) -> dict[tuple, Fp8Layout]:
    """{path: layout} of the parameters an official FP8 checkpoint stores as e4m3 + block scales
    (load_hf(precision="fp8") keeps them so); empty when the config has no FP8 block size."""
    if cfg.fp8_block_size is None:
        return {}
    from dsv3_jax.weights import _stored_layout, key_map
    groups: dict[tuple, list] = {}
    for e in key_map(cfg):
        if e.n_in and not any(e.path[-len(s):] == s for s in NOT_FP8):
            groups.setdefault(tuple(e.path), []).append(e)
    out = {}
    for v in variables(cfg):
        if v.path in groups:
            group = groups[v.path]
            shape, scale_shape, block = _stored_layout(cfg, group, v.shape)
            out[v.path] = Fp8Layout(tuple(shape), tuple(scale_shape), tuple(block), group[0].n_in)
    return out


def stored_fp8(setup) -> bool:
    """Serving the official FP8 checkpoint as stored (`--serve --precision fp8` on a config
    with a `quantization_config`): what load_hf(precision="fp8") keeps."""
    return setup.serve and setup.precision == "fp8" and setup.config.fp8_block_size is not None


def _mesh(sizes):
    return types.SimpleNamespace(shape=sizes)


def _spec(axes, shape, sizes: dict[str, int]) -> tuple:
    """The rules' PartitionSpec entries for an array, padded to one per dimension."""
    from sharding.rules import logical_to_spec
    spec = tuple(logical_to_spec(axes, shape, _mesh(sizes)))
    return spec + (None,) * (len(shape) - len(spec))


def _split(entry, sizes: dict[str, int]) -> int:
    """How many ways one PartitionSpec entry (None, an axis or a tuple of axes) splits its dim."""
    names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    return math.prod(sizes[a] for a in names)


def shard_elements(axes, shape, sizes: dict[str, int]) -> int:
    """Elements of one device's shard of an array laid out by the logical-axis rules."""
    return math.prod(shape) // math.prod(_split(e, sizes) for e in _spec(axes, shape, sizes))


def _arrays(v: Var, sizes, itemsize: int, layout: Fp8Layout | None):
    """(logical axes, shape, padded spec, itemsize) of the arrays holding `v`: itself, or its
    e4m3 values and fp32 block scales, placed like `sharding.rules.quantized_specs` does."""
    if layout is None:
        fixed = v.fixed and not v.is_param  # Params are counted in the parameter dtype
        return [(v.axes, v.shape, _spec(v.axes, v.shape, sizes),
                 jnp.dtype(v.fixed).itemsize if fixed else itemsize)]
    from dsv3_jax.fp8 import stored_order
    from sharding.rules import quantized_specs
    q_spec, s_spec = quantized_specs(v.axes, v.shape, layout.scale_shape, layout.block,
                                     _mesh(sizes), n_in=layout.n_in)
    lead, n_in = len(layout.scale_shape) - 2, layout.n_in
    pad = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))  # noqa: E731
    s_axes = v.axes[:lead] + (v.axes[lead + n_in], v.axes[lead])
    return [(stored_order(v.axes, lead, n_in), layout.shape, pad(q_spec, len(v.shape)), 1),
            (s_axes, layout.scale_shape, pad(s_spec, len(layout.scale_shape)), 4)]


def _layouts(setup) -> dict:
    return fp8_layouts(setup.config) if stored_fp8(setup) else {}


def gathered_layer_bytes(setup, dtype) -> int:
    """Bytes one device gathers for the largest layer: each stacked weight of one layer as
    the compute uses it (its "embed" dims whole), less the shard it stores (FP8 weights kept
    as stored: their values and scales)."""
    sizes, itemsize, layouts = setup.sizes, jnp.dtype(dtype).itemsize, _layouts(setup)
    per_stack: dict[int, int] = {}
    for v in variables(setup.config):
        if not v.is_param or not v.axes or v.axes[0] != "layers":
            continue
        for axes, shape, spec, size in _arrays(v, sizes, itemsize, layouts.get(v.path)):
            used = stored = 1
            for name, entry in zip(axes[1:], spec[1:]):
                n = _split(entry, sizes)
                stored *= n
                used *= 1 if name in FSDP_AXES else n
            layer = math.prod(shape[1:])
            per_stack[shape[0]] = per_stack.get(shape[0], 0) + (layer // used - layer // stored) * size
    return max(per_stack.values(), default=0)


def stage_layer_bytes(setup, dtype) -> int:
    """W: bytes of one stage's pipelined MoE layers per device, in the stage's layout (split by
    layer over the pipeline axis, every other dim as stored but without the pipeline axis)."""
    from sharding.pipeline import layer_split_spec
    sizes, cfg = setup.sizes, setup.config
    per_stage = cfg.num_moe_layers // setup.stages
    total = 0
    for v in variables(cfg):
        if not v.is_param or not v.axes or v.axes[0] != "layers" or v.shape[0] != cfg.num_moe_layers:
            continue
        spec = tuple(layer_split_spec(v.axes, v.shape, _mesh(sizes)))[1:]
        total += per_stage * math.prod(v.shape[1:]) // math.prod(_split(e, sizes) for e in spec)
    return total * jnp.dtype(dtype).itemsize


def state_bytes(setup, dtype) -> tuple[int, int, int]:
    """(Param bytes, Param elements, other variables' bytes) per device; Params in `dtype`, or
    serving the FP8 checkpoint as stored, its FP8 weights as e4m3 values + fp32 block scales."""
    itemsize, layouts = jnp.dtype(dtype).itemsize, _layouts(setup)
    params = elements = other = 0
    for v in variables(setup.config):
        for axes, shape, spec, size in _arrays(v, setup.sizes, itemsize, layouts.get(v.path)):
            n = math.prod(shape) // math.prod(_split(e, setup.sizes) for e in spec)
            if v.is_param:
                params, elements = params + n * size, elements + n
            else:
                other += n * size
    return params, elements, other
