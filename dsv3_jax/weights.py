"""HF safetensors checkpoints <-> our parameters (SPEC section 8).

`key_map(cfg)` is the single table between checkpoint keys and our parameter paths: for every
HF tensor, the parameter it fills, the index into that parameter (layer of a stack, expert of
a layer) and how many leading dims of our slice form the matmul input (HF stores [out, in];
we store [in..., out...]). Loading reads tensor by tensor from memory maps and fills one
parameter at a time, each device (process) reading only the tensors its shards touch, and of
those only its own part (FP8 tensors it dequantizes: whole, then sliced). FP8 block-quantized
weights are dequantized with their `weight_scale_inv`, or kept as stored (`precision="fp8"`:
e4m3 values [out..., in...] and block scales, the checkpoint's orientation, no transpose; split
over a mesh at block boundaries). Saving writes bf16 / fp32, and stored FP8 weights as is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import QuantizedWeight, stored_order
from dsv3_jax.layers.linear import Precision, as_precision
from dsv3_jax.model import Transformer, abstract_model
from dsv3_jax.safetensors_io import CheckpointError, CheckpointReader
from sharding.rules import quantized_specs, variable_sharding

__all__ = ["CheckpointError", "key_map", "load_hf", "save_hf"]

# Keys some checkpoints carry that hold nothing we need.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: where it lives in our parameters."""

    hf_key: str
    path: tuple            # our parameter path in nnx.state(model)
    index: tuple = ()      # leading indices into that parameter (layer, expert)
    n_in: int = 0          # 0: copied as is; else HF [out, in] with `n_in` leading input dims


def _block_entries(cfg: ModelConfig, prefix: str, path: tuple, index: tuple, moe: bool) -> list[Entry]:
    def lin(name, ours, n_in=1):
        return Entry(prefix + name + ".weight", path + ours, index, n_in)

    def vec(name, ours):
        return Entry(prefix + name, path + ours, index)

    out = [vec("input_layernorm.weight", ("input_layernorm", "weight")),
           vec("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"))]
    if cfg.q_lora_rank:
        out += [lin("self_attn.q_a_proj", ("self_attn", "q_a_proj")),
                vec("self_attn.q_a_layernorm.weight", ("self_attn", "q_a_layernorm", "weight")),
                lin("self_attn.q_b_proj", ("self_attn", "q_b_proj"))]
    else:
        out.append(lin("self_attn.q_proj", ("self_attn", "q_proj")))
    out += [lin("self_attn.kv_a_proj_with_mqa", ("self_attn", "kv_a_proj_with_mqa")),
            vec("self_attn.kv_a_layernorm.weight", ("self_attn", "kv_a_layernorm", "weight")),
            lin("self_attn.kv_b_proj", ("self_attn", "kv_b_proj")),
            lin("self_attn.o_proj", ("self_attn", "o_proj"), n_in=2)]
    if not moe:
        return out + [lin(f"mlp.{p}", ("mlp", p)) for p in ("gate_proj", "up_proj", "down_proj")]
    out.append(lin("mlp.gate", ("mlp", "gate", "weight")))
    if cfg.topk_method == "noaux_tc":
        out.append(vec("mlp.gate.e_score_correction_bias", ("mlp", "gate", "e_score_correction_bias")))
    if cfg.n_shared_experts:
        out += [lin(f"mlp.shared_experts.{p}", ("mlp", "shared_experts", p))
                for p in ("gate_proj", "up_proj", "down_proj")]
    for e in range(cfg.n_routed_experts):
        out += [Entry(f"{prefix}mlp.experts.{e}.{p}.weight", path + ("mlp", "experts", p),
                      index + (e,), 1) for p in ("gate_proj", "up_proj", "down_proj")]
    return out


def key_map(cfg: ModelConfig) -> list[Entry]:
    """Every checkpoint tensor of `cfg`, in checkpoint order."""
    entries = [Entry("model.embed_tokens.weight", ("embed_tokens",))]
    for layer in range(cfg.num_hidden_layers):
        moe = layer >= cfg.first_k_dense_replace
        stack, i = ("moe_layers", layer - cfg.first_k_dense_replace) if moe else ("dense_layers", layer)
        entries += _block_entries(cfg, f"model.layers.{layer}.", (stack,), (i,), moe)
    for k in range(cfg.num_nextn_predict_layers):
        p, path = f"model.layers.{cfg.num_hidden_layers + k}.", ("mtp", k)
        entries += [Entry(p + "enorm.weight", path + ("enorm", "weight")),
                    Entry(p + "hnorm.weight", path + ("hnorm", "weight")),
                    Entry(p + "eh_proj.weight", path + ("eh_proj",), (), 1)]
        entries += _block_entries(cfg, p, path + ("block",), (), True)
        entries.append(Entry(p + "shared_head.norm.weight", path + ("shared_head_norm", "weight")))
    entries += [Entry("model.norm.weight", ("norm", "weight")),
                Entry("lm_head.weight", ("lm_head",), (), 1)]
    return entries


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """MTP-layer keys that copy the main embedding / head (we share those) -> the main key."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}."
        out[p + "embed_tokens.weight"] = "model.embed_tokens.weight"
        out[p + "shared_head.head.weight"] = "lm_head.weight"
    return out


def _hf_shape(slice_shape: tuple, n_in: int) -> tuple:
    if not n_in:
        return tuple(slice_shape)
    return (math.prod(slice_shape[n_in:]), math.prod(slice_shape[:n_in]))


def _scale_key(key: str) -> str:
    return key + "_scale_inv"


def dequantize_fp8(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """W = float32(q) * scale_inv[r // block_r, c // block_c] (edge blocks may be partial)."""
    rows, cols = q.shape
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block[0], 0), block[1], 1)
    return np.asarray(q).astype(np.float32) * s[:rows, :cols]


def _scale_inv(reader: CheckpointReader, cfg: ModelConfig, key: str, shape: tuple) -> np.ndarray:
    """The checked `weight_scale_inv` of FP8 tensor `key` ([out / b0, in / b1])."""
    skey = _scale_key(key)
    if skey not in reader:
        raise CheckpointError(f"tensor {key!r} is float8 but {skey!r} is missing")
    block = cfg.fp8_block_size or (128, 128)
    want_s = tuple(-(-n // b) for n, b in zip(shape, block))
    if reader.shape(skey) != want_s:
        raise CheckpointError(f"tensor {skey!r} has shape {list(reader.shape(skey))}, expected "
                              f"{list(want_s)} for {list(shape)} weights in {block} blocks")
    return reader.get(skey)


def _read(reader: CheckpointReader, cfg: ModelConfig, e: Entry, slice_shape: tuple,
          dtype: np.dtype, part: str = "value", index: tuple = ()) -> np.ndarray:
    """One tensor in our layout, or its part `index`: dequantized ("value"), or as stored, e4m3
    [out..., in...] ("q": a view of the memory map) or block scales ("scale"). Raw and
    unquantized tensors are sliced on the map before they are converted: only that part is read."""
    key = e.hf_key
    want = _hf_shape(slice_shape, e.n_in)
    if reader.shape(key) != want:
        raise CheckpointError(f"tensor {key!r} has shape {list(reader.shape(key))}, "
                              f"expected {list(want)} for this config")
    t = reader.get(key)
    if part == "scale":
        return np.asarray(_scale_inv(reader, cfg, key, t.shape)[index], np.float32)
    if part == "q":  # as stored: the checkpoint's [out, in] split into our dims, no transpose
        return np.asarray(t.reshape(stored_order(slice_shape, 0, e.n_in))[index])
    if part == "value" and t.dtype == E4M3:
        t = dequantize_fp8(t, _scale_inv(reader, cfg, key, t.shape), cfg.fp8_block_size or (128, 128))
    t = t.T.reshape(slice_shape) if e.n_in else t.reshape(slice_shape)  # views of the map
    return np.asarray(t[index]).astype(dtype)


def _check_keys(reader: CheckpointReader, cfg: ModelConfig, entries: list[Entry], path) -> None:
    expected = {e.hf_key for e in entries}
    present = set(reader.keys())
    missing = sorted(expected - present)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        hint = ""
        if any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in missing):
            hint = " (the MTP layer; load with mtp=False to skip it)"
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{more}{hint}")
    known = expected | {_scale_key(k) for k in expected} | set(_mtp_copies(cfg))
    unexpected = sorted(k for k in present - known if not _IGNORED.match(k))
    if unexpected:
        mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
        if all(k.startswith(mtp_prefix) for k in unexpected) and not cfg.num_nextn_predict_layers:
            return  # an MTP layer the caller chose not to load
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}{more} "
                              "for this config")


def _block_reader(reader: CheckpointReader, cfg: ModelConfig, group: list[Entry], shape: tuple,
                  dtype: np.dtype, part: str = "value", weight_slice: tuple | None = None):
    """Callback for `jax.make_array_from_callback`: builds one shard of a parameter.

    Only the checkpoint tensors that fall inside the shard's leading (layer, expert) slice are
    read, so a device's shard of a stacked expert weight never needs the whole stack on the host.
    """
    n_lead = len(group[0].index)

    def block(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape)]
        out = np.empty([len(r) for r in ranges], dtype)
        lead, rest = ranges[:n_lead], index[n_lead:]
        for e in group:
            if all(i in r for i, r in zip(e.index, lead)):
                where = tuple(r.index(i) for i, r in zip(e.index, lead))
                out[where] = _read(reader, cfg, e, weight_slice or shape[n_lead:], dtype, part, rest)
        return out

    return block


def _stored_layout(cfg: ModelConfig, group: list[Entry], shape: tuple):
    """(values' [lead..., out..., in...], scales' [lead..., N / b0, K / b1] shapes, block) of a
    parameter kept as stored: the checkpoint's orientation."""
    n_lead, n_in = len(group[0].index), group[0].n_in
    hf_out, hf_in = _hf_shape(shape[n_lead:], n_in)
    b0, b1 = cfg.fp8_block_size
    return (stored_order(shape, n_lead, n_in),
            shape[:n_lead] + (-(-hf_out // b0), -(-hf_in // b1)), (b0, b1))


def _stored_shardings(cfg: ModelConfig, var, group: list[Entry], shape: tuple, mesh, name: str):
    """(values, scales) NamedShardings of a parameter kept as stored (sharding/rules.py:
    whole blocks per device; BlockAlignmentError when a required split cannot keep them)."""
    _, scale_shape, block = _stored_layout(cfg, group, shape)
    axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
    q_spec, s_spec = quantized_specs(axes, shape, scale_shape, block, mesh, n_in=group[0].n_in,
                                     name=name)
    return NamedSharding(mesh, q_spec), NamedSharding(mesh, s_spec)


def _stored_fp8(reader, cfg, group: list[Entry], shape: tuple, shardings) -> QuantizedWeight:
    """A parameter kept as the checkpoint stores it: e4m3 values + block scales in the
    checkpoint's orientation, each device reading only its own blocks of both."""
    q_shape, scale_shape, block = _stored_layout(cfg, group, shape)
    weight = shape[len(group[0].index):]  # one checkpoint tensor's slice, parameter layout
    q = jax.make_array_from_callback(q_shape, shardings[0], _block_reader(
        reader, cfg, group, q_shape, E4M3, "q", weight))
    scale = jax.make_array_from_callback(scale_shape, shardings[1], _block_reader(
        reader, cfg, group, scale_shape, np.dtype(np.float32), "scale", weight))
    return QuantizedWeight(q=q, scale=scale, block=block, n_in=group[0].n_in)


def load_hf(path: str | Path, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
            mtp: bool = True, capacity_factor: float | None = None,
            precision: str | None = None) -> Transformer:
    """A ready model from a HF checkpoint folder (bf16, fp32 or FP8 block-quantized).

    `precision` ("fp32", "bf16", "fp8": bf16 activations with block-scaled e4m3 projections
    and experts) sets the compute; without it `dtype` is the compute dtype. `param_dtype` is
    the stored one (default: the compute dtype); the routing bias stays fp32. `mtp=False` skips the MTP layer. With a `mesh` (sharding.make_mesh) each
    parameter is placed by the logical-axis rules as it is read, each device reading only its
    own shard's tensors, and MoE layers dispatch expert-parallel (`capacity_factor` None:
    dropless). FP8 weights kept as stored are split at block boundaries, values and scales
    alike (sharding/rules.py `quantized_specs`); a split the expert-parallel MoE needs but the
    blocks do not allow fails before anything is read (`BlockAlignmentError`).
    """
    path = Path(path)
    cfg = ModelConfig.from_json(path)
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if precision is not None:
        dtype = Precision.named(precision)
    param_dtype = param_dtype or as_precision(dtype).dtype
    reader = CheckpointReader(path)
    entries = key_map(cfg)
    _check_keys(reader, cfg, entries, path)
    by_path = defaultdict(list)
    for e in entries:
        by_path[e.path].append(e)

    keep_fp8 = as_precision(dtype).fp8 and cfg.fp8_block_size is not None
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                           capacity_factor=capacity_factor)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    plan = []  # every parameter's tensors and shardings, checked before anything is read
    for var_path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, var_path))
        group = by_path.pop(tuple(var_path), None)
        if group is None:
            raise CheckpointError(f"no checkpoint tensor fills parameter {name}")
        shape = tuple(var.shape)
        lead = math.prod(shape[:len(group[0].index)])
        if len(group) != lead:
            raise CheckpointError(f"parameter {var_path} is only partly filled by the checkpoint")
        stored = keep_fp8 and group[0].n_in and all(reader.dtype(e.hf_key) == E4M3 for e in group)
        if stored:
            sharding = ((single, single) if mesh is None
                        else _stored_shardings(cfg, var, group, shape, mesh, name))
        else:
            sharding = variable_sharding(var, mesh) if mesh is not None else single
        plan.append((var, group, shape, stored, sharding))
    if by_path:
        raise CheckpointError(f"key map names parameters the model lacks: {list(by_path)[:5]}")
    for var, group, shape, stored, sharding in plan:
        if stored:
            var.set_value(_stored_fp8(reader, cfg, group, shape, sharding))
        else:
            var.set_value(jax.make_array_from_callback(
                shape, sharding, _block_reader(reader, cfg, group, shape, np.dtype(var.dtype))))
    return model


def _params_by_path(model: Transformer) -> dict[tuple, jax.Array | QuantizedWeight]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _fp8_config(cfg: ModelConfig, quantized: dict) -> dict:
    """The quantization_config of a checkpoint holding `quantized` ({path: QuantizedWeight})."""
    blocks = {qw.block for qw in quantized.values()}
    if len(blocks) > 1:
        raise ValueError(f"FP8 weights held in different block sizes {sorted(blocks)}: a "
                         "checkpoint has one weight_block_size; save with dtype=jnp.bfloat16")
    bk, bn = blocks.pop()
    conf = dict(cfg.quantization_config or {"activation_scheme": "dynamic", "fmt": "e4m3",
                                            "quant_method": "fp8"})
    conf["weight_block_size"] = [bn, bk]  # HF [out, in] orientation
    return conf


def save_hf(model: Transformer, path: str | Path, *, dtype=None,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a HF checkpoint folder: config.json, per-expert keys, sharded files.

    `dtype` (bf16 or fp32) defaults to each parameter's own; the routing bias stays fp32.
    FP8 weights kept as stored (`QuantizedWeight`, from `precision="fp8"` on an FP8 checkpoint)
    are written as the official FP8 checkpoints hold them: float8_e4m3fn values [out, in] and a
    float32 `weight_scale_inv` [ceil(out / b0), ceil(in / b1)], with the `quantization_config`,
    byte for byte what was loaded; with a `dtype` they are dequantized to it instead. Sharded
    models are gathered tensor by tensor. Files are written to a temporary folder first and
    moved into place at the end, so a failed save leaves an existing checkpoint at `path`
    untouched.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    params = _params_by_path(model)
    quantized = {p: v for p, v in params.items() if isinstance(v, QuantizedWeight)}
    fp8 = bool(quantized) and dtype is None
    cfg = model.cfg.replace(quantization_config=_fp8_config(model.cfg, quantized) if fp8 else None)
    entries = key_map(cfg)
    copies = _mtp_copies(cfg)
    by_key = {e.hf_key: e for e in entries}

    def part(e: Entry, v):  # one checkpoint tensor's slice of a parameter
        return v.take(e.index) if isinstance(v, QuantizedWeight) else v[e.index] if e.index else v

    def to_hf(e: Entry, v: np.ndarray) -> np.ndarray:  # [in..., out...] -> [out, in]
        return v.reshape(math.prod(v.shape[:e.n_in]), -1).T if e.n_in else v

    scales = {_scale_key(e.hf_key): e for e in entries if fp8 and e.path in quantized}

    def tensor(key: str) -> np.ndarray:
        if key in scales:
            e = scales[key]
            return np.asarray(part(e, params[e.path].scale), np.float32)
        e = by_key[copies.get(key, key)]
        v = part(e, params[e.path])
        if isinstance(v, QuantizedWeight):  # stored [out..., in...]: the checkpoint's order
            if fp8:
                return np.asarray(v.flat().q)
            v = v.dequantize()
        v = to_hf(e, np.asarray(v))
        if dtype is not None and not e.hf_key.endswith("e_score_correction_bias"):
            v = v.astype(dtype)
        return np.ascontiguousarray(v)

    keys = []
    for e in entries:
        keys.append(e.hf_key)
        if _scale_key(e.hf_key) in scales:
            keys.append(_scale_key(e.hf_key))
    for k in range(cfg.num_nextn_predict_layers):  # the official layout repeats these
        p = f"model.layers.{cfg.num_hidden_layers + k}."
        keys += [p + "embed_tokens.weight", p + "shared_head.head.weight"]

    def nbytes(key):
        if key in scales:
            e = scales[key]
            return math.prod(params[e.path].scale.shape[len(e.index):]) * 4
        e = by_key[copies.get(key, key)]
        v = params[e.path]
        shape = v.shape[len(e.index):]
        if isinstance(v, QuantizedWeight):  # without fp8, a dtype was given
            itemsize = 1 if fp8 else np.dtype(dtype).itemsize
        else:
            itemsize = np.dtype(dtype or v.dtype).itemsize
        if e.hf_key.endswith("e_score_correction_bias"):
            itemsize = 4
        return math.prod(shape) * itemsize

    shards, size = [[]], 0
    for key in keys:
        n = nbytes(key)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".dsv3_tmp_save"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map = {}
        for name, shard in zip(names, shards):
            save_file({k: tensor(k) for k in shard}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes(k) for k in keys)},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        conf = cfg.to_dict()
        save_dtype = np.dtype(dtype or params[("embed_tokens",)].dtype)
        conf["torch_dtype"] = {"bfloat16": "bfloat16", "float32": "float32",
                               "float16": "float16"}.get(save_dtype.name, save_dtype.name)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2))
        written = {f.name for f in tmp.iterdir()}
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        # Only now remove files of an older checkpoint in the same folder that we did not rewrite.
        for stale in list(path.glob("*.safetensors")) + list(path.glob("model.safetensors.index.json")):
            if stale.name not in written:
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
