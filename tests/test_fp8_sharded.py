"""Official-format FP8 checkpoints kept as stored (precision="fp8") on a mesh: e4m3 values and
block scales split at block boundaries by the rules table, each device reading and holding only
its own blocks, the engine's greedy tokens equal to the single-device FP8 engine's, a clear
error where a required split would cut blocks, and an exact FP8 save / load round trip."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from dsv3_jax import save_hf
from dsv3_jax import weights as weights_lib
from dsv3_jax.fp8 import QuantizedWeight
from dsv3_jax.safetensors_io import CheckpointReader
from dsv3_jax.serve.engine import Engine
from dsv3_jax.serve.loading import load_for_serving
from dsv3_jax.weights import key_map, load_hf
from sharding import make_mesh
from sharding.rules import BlockAlignmentError, quantized_specs, variable_sharding
from tests.conftest import FIXTURES

B16 = FIXTURES / "v3_mtp_fp8_b16"   # 16 x 16 blocks: every mesh below splits it somewhere
B128 = FIXTURES / "v3_fp8_b128"     # 128 x 128 blocks on dims of 144..192: few splits align
MESHES = ["expert=8", "data=2,tensor=2,expert=2"]
# placement only (no compile): the dense weights' embed dim split FSDP-style at block boundaries
PLACEMENT_MESHES = MESHES + ["fsdp=2,expert=4"]
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [100, 50, 25, 12, 6, 3], [200, 201]]
NEW_TOKENS = 6
E4M3 = jnp.float8_e4m3fn


@pytest.fixture(scope="module")
def single_device_tokens():
    model, *_ = load_for_serving(B16, precision="fp8")
    return Engine(model, max_seq_len=32, max_batch=8, speculative=False).generate(PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def loaded():
    """{spec: (mesh, model, [(hf_key, part, returned shape)] read by the loader)}."""
    cache = {}

    def load(spec):
        if spec not in cache:
            reads = []
            original = weights_lib._read

            def recording(reader, cfg, e, slice_shape, dtype, part="value", index=()):
                out = original(reader, cfg, e, slice_shape, dtype, part, index)
                reads.append((e.hf_key, part, out.shape))
                return out

            weights_lib._read = recording
            try:
                mesh = make_mesh(spec)
                model, *_ = load_for_serving(B16, precision="fp8", mesh=mesh)
            finally:
                weights_lib._read = original
            cache[spec] = (mesh, model, reads)
        return cache[spec]

    return load


def _parts(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _shard_shape(shape, spec, mesh):
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(d // math.prod(mesh.shape[a] for a in _parts(s)) for d, s in zip(shape, spec))


def _rows(sl: slice, n: int) -> tuple[int, int]:
    return sl.indices(n)[:2]


def _check_blocks_cover_values(name, qw: QuantizedWeight, n_in: int, mesh):
    """On every device the scale shard is exactly the blocks of the value shard (values
    [lead..., out..., in...], scales [lead..., N / block[0], K / block[1]])."""
    lead = qw.scale.ndim - 2
    dims = qw.q.shape[lead:]
    n_out = len(dims) - n_in
    assert qw.n_in == n_in, name
    groups = [(lead, math.prod(dims[1:n_out]), qw.block[0]),
              (lead + n_out, math.prod(dims[n_out + 1:]), qw.block[1])]
    q_index = qw.q.sharding.devices_indices_map(qw.q.shape)
    s_index = qw.scale.sharding.devices_indices_map(qw.scale.shape)
    for dev in mesh.devices.flat:
        qi, si = q_index[dev], s_index[dev]
        for d in range(lead):
            assert _rows(qi[d], qw.q.shape[d]) == _rows(si[d], qw.scale.shape[d]), (name, dev)
        for g, (qdim, inner, block) in enumerate(groups):
            a0, a1 = _rows(qi[qdim], qw.q.shape[qdim])
            s0, s1 = _rows(si[lead + g], qw.scale.shape[lead + g])
            # values' rows (flattened over the group) [a0 * inner, a1 * inner) are blocks [s0, s1)
            assert a0 * inner == s0 * block, (name, dev, g)
            assert -(-a1 * inner // block) == s1, (name, dev, g)
            full = math.prod(dims[:n_out]) if g == 0 else math.prod(dims[n_out:])
            assert a1 * inner == full or (a1 * inner) % block == 0, (name, dev, g)


@pytest.mark.parametrize("spec", PLACEMENT_MESHES)
def test_fp8_weights_stay_e4m3_split_at_block_boundaries(spec, loaded):
    mesh, model, reads = loaded(spec)
    reader = CheckpointReader(B16)
    variables = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    host = {}
    stored = 0
    for e in key_map(model.cfg):
        var = variables[e.path]
        value = var.get_value()
        if reader.dtype(e.hf_key) != np.dtype(E4M3):
            assert not isinstance(value, QuantizedWeight), e.hf_key
            continue
        stored += 1
        name = ".".join(map(str, e.path))
        assert isinstance(value, QuantizedWeight), e.hf_key
        assert value.q.dtype == E4M3 and value.scale.dtype == jnp.float32, e.hf_key
        if e.path not in host:  # first entry of a stack: placement checks, once per parameter
            host[e.path] = (np.asarray(value.q), np.asarray(value.scale))
            want = variable_sharding(var, mesh)  # the rules table's answer for this variable
            for arr, sharding in ((value.q, want.q), (value.scale, want.scale)):
                assert arr.sharding.is_equivalent_to(sharding, arr.ndim), name
                assert len(arr.sharding.device_set) == 8, name
                expect = _shard_shape(arr.shape, sharding.spec, mesh)
                for shard in arr.addressable_shards:
                    assert shard.data.shape == expect, (name, shard.device)
                    assert shard.data.dtype == arr.dtype
            _check_blocks_cover_values(name, value, e.n_in, mesh)
        q, s = (a[e.index] if e.index else a for a in host[e.path])
        hf = np.asarray(reader.get(e.hf_key))  # held in the checkpoint's [out, in] order
        np.testing.assert_array_equal(q.reshape(hf.shape).view(np.uint8), hf.view(np.uint8))
        np.testing.assert_array_equal(s, reader.get(e.hf_key + "_scale_inv"))
    assert stored >= 100

    # the routed experts are split over the expert axis (and their FFN width over tensor):
    # each device holds and reads only its own experts' blocks
    experts = model.moe_layers.mlp.experts.gate_proj.get_value()
    layers, n_exp, f, d = experts.q.shape  # [out, in]: the FFN width before the embedding
    tp = mesh.shape["tensor"]
    for arr, width in ((experts.q, f), (experts.scale, experts.scale.shape[-2])):
        for shard in arr.addressable_shards:
            assert shard.data.shape[:2] == (layers, n_exp // mesh.shape["expert"])
            assert shard.data.shape[-2] == width // tp
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    fs = mesh.shape["fsdp"]  # the expert stacks' embed dim is split over fsdp too
    got = {(part, shape) for k, part, shape in reads if k == key}
    assert got == {("q", (f // tp, d // fs)), ("scale", (f // 16 // tp, d // 16 // fs))}, got
    if spec == "data=2,tensor=2,expert=2":  # a dense weight split FSDP-style over expert (blocks of 16)
        kv_b = model.moe_layers.self_attn.kv_b_proj.get_value()  # [layers, heads, dim, kv_lora]
        assert kv_b.q.addressable_shards[0].data.shape[-1] == kv_b.q.shape[-1] // 2
    if spec == "fsdp=2,expert=4":  # embed 64 over fsdp x expert = 8 would cut 16-blocks: fsdp only
        q_a = model.moe_layers.self_attn.q_a_proj.get_value()  # [layers, q_lora, embed]
        assert tuple(q_a.q.sharding.spec)[2] == "fsdp" and tuple(q_a.scale.sharding.spec)[2] == "fsdp"


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_fp8_greedy_matches_single_device(spec, loaded, single_device_tokens):
    mesh, model, _ = loaded(spec)
    engine = Engine(model, max_seq_len=32, max_batch=8, mesh=mesh, speculative=False)
    assert engine.generate(PROMPTS, NEW_TOKENS) == single_device_tokens


def test_a_required_split_that_cuts_blocks_is_a_clear_error():
    """128-wide blocks on an expert FFN width of 144: a tensor axis of 2 would give each device
    72 columns, and the expert-parallel MoE needs that split. Nothing is read first."""
    with pytest.raises(BlockAlignmentError,
                       match=r"moe_layers\.mlp\.experts\.down_proj: its expert_mlp dimension of 144 "
                             r"split over mesh axis tensor \(2\) gives shards of 72, which cut its "
                             r"FP8 blocks of 128.*work for tensor: 1; or load with precision='bf16'"):
        load_hf(B128, precision="fp8", mesh=make_mesh("data=2,tensor=2,expert=2"))


def test_splits_that_cut_blocks_fall_back_to_fewer_axes():
    """Where the table's split would cut blocks and nothing requires it, the weight is held
    whole along that dim (like a dim the mesh does not divide), values and scales alike."""
    mesh = make_mesh("data=4,expert=2")
    model = load_hf(B128, precision="fp8", mesh=mesh)
    q_a = model.moe_layers.self_attn.q_a_proj.get_value()   # embed 192 over expert 2: 96 < 128
    assert q_a.q.sharding.is_fully_replicated and q_a.scale.sharding.is_fully_replicated
    experts = model.moe_layers.mlp.experts.up_proj.get_value()  # experts split, no blocks there
    assert experts.q.addressable_shards[0].data.shape[1] == 2
    assert experts.scale.addressable_shards[0].data.shape[1] == 2
    _check_blocks_cover_values("up_proj", experts, 1, mesh)
    # the 671B layout on one 8-GPU node (expert=8), from the shapes alone
    e8 = make_mesh("expert=8")

    def spec(axes, shape, scale, n_in=1):  # the parameter's axes and shape; scales [N/b, K/b]
        return quantized_specs(axes, shape, scale, (128, 128), e8, n_in=n_in)

    P = jax.sharding.PartitionSpec
    assert spec(("layers", "experts", "embed", "expert_mlp"), (58, 256, 7168, 2048),
                (58, 256, 16, 56)) == (P(None, "expert", None, None), P(None, "expert", None, None))
    # q_lora 1536 / 8 = 192 rows would cut 128-blocks: q_b_proj stays whole on each device
    assert spec(("q_lora", "heads", "head_dim"), (1536, 128, 192), (192, 12)) == (
        P(None, None, None), P(None, None))
    # embed 7168 / 8 = 896 = 7 blocks: split, and the scales with it; the values are stored
    # [embed, heads, head_dim] (out before in), the split follows the embed dim
    assert spec(("heads", "head_dim", "embed"), (128, 128, 7168), (56, 128), n_in=2) == (
        P("expert", None, None), P("expert", None))
    # q_a_proj [embed, q_lora]: embed wins the expert axis as for an unquantized weight
    # (stored [q_lora, embed]; q_lora 1536 could not take it anyway at 128-blocks)
    assert spec(("embed", "q_lora"), (7168, 1536), (12, 56)) == (P(None, "expert"), P(None, "expert"))


def test_fp8_save_load_round_trip_is_exact(tmp_path, loaded):
    """save_hf writes stored FP8 weights in the official layout: the same bytes of values and
    weight_scale_inv as the checkpoint they were loaded from (here from a sharded model)."""
    _, model, _ = loaded("data=2,tensor=2,expert=2")
    save_hf(model, tmp_path / "fp8", max_shard_bytes=100_000)
    ours, theirs = CheckpointReader(tmp_path / "fp8"), CheckpointReader(B16)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for k in theirs.keys():
        a, b = np.asarray(ours.get(k)), np.asarray(theirs.get(k))
        if b.dtype == np.dtype(E4M3) or k.endswith("_scale_inv"):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=k)
    conf = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert conf["quantization_config"]["weight_block_size"] == [16, 16]
    again = load_hf(tmp_path / "fp8", precision="fp8")
    for (path, v), (_, w) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        for x, y in zip(jax.tree.leaves(v.get_value()), jax.tree.leaves(w.get_value())):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x).view(np.uint8),
                                                         np.asarray(y).view(np.uint8)), path
    # with a dtype the stored weights are dequantized: W = float32(q) * scale_inv[r // 16, c // 16]
    save_hf(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    key = "model.layers.2.self_attn.o_proj.weight"
    want = weights_lib.dequantize_fp8(theirs.get(key), theirs.get(key + "_scale_inv"), (16, 16))
    got = CheckpointReader(tmp_path / "bf16").get(key)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), want.astype(jnp.bfloat16))
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
