"""Stored FP8 weights keep the official checkpoint's [out, in] orientation (dsv3_jax/fp8.py
QuantizedWeight): what load_hf(precision="fp8") holds is the checkpoint's bytes in the
checkpoint's order, and XLA:GPU's FP8 GEMMs, which take both operands K-major (contraction dim
minor), read them with no transposed copy. Held [in, out], the 671B decode step on 8 x H200
kept a transposed copy of every e4m3 weight (85 GB per device, SCALE.md)."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax import weights as weights_lib
from dsv3_jax.fp8 import QuantizedWeight
from dsv3_jax.layers.linear import Precision, project
from dsv3_jax.safetensors_io import CheckpointReader
from dsv3_jax.weights import key_map, load_hf
from tests.conftest import FIXTURES

HAVE_GPU = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
E4M3 = np.dtype(jnp.float8_e4m3fn)


def _is_view_of_map(a) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


@pytest.mark.parametrize("case", ["v3_fp8_b128", "v3_mtp_fp8_b16"])
def test_loaded_fp8_values_are_the_checkpoint_bytes_in_its_order(case, monkeypatch):
    """Every e4m3 tensor is read as a view of the checkpoint's memory map (no transposed host
    copy), and the device values hold its bytes in the same order: the flattened values equal
    the flattened checkpoint tensor, the scales equal weight_scale_inv, shape and all."""
    reads = []
    original = weights_lib._read

    def recording(reader, cfg, e, slice_shape, dtype, part="value", index=()):
        out = original(reader, cfg, e, slice_shape, dtype, part, index)
        reads.append((e.hf_key, part, out))
        return out

    monkeypatch.setattr(weights_lib, "_read", recording)
    model = load_hf(FIXTURES / case, precision="fp8")
    reader = CheckpointReader(FIXTURES / case)
    q_reads = [(k, out) for k, part, out in reads if part == "q"]
    assert q_reads and all(_is_view_of_map(out) for _, out in q_reads), \
        [k for k, out in q_reads if not _is_view_of_map(out)][:3]
    params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    stored = 0
    for e in key_map(model.cfg):
        if reader.dtype(e.hf_key) != E4M3:
            continue
        qw = params[e.path].take(e.index)
        hf = np.asarray(reader.get(e.hf_key))
        assert math.prod(qw.q.shape[:len(qw.q.shape) - e.n_in]) == hf.shape[0], e.hf_key
        np.testing.assert_array_equal(np.asarray(qw.q).reshape(-1).view(np.uint8),
                                      hf.reshape(-1).view(np.uint8), err_msg=e.hf_key)
        scale = np.asarray(qw.scale)
        np.testing.assert_array_equal(scale, reader.get(e.hf_key + "_scale_inv"), err_msg=e.hf_key)
        stored += 1
    assert stored >= 20


@pytest.mark.skipif(not HAVE_GPU, reason='jax-cuda12-plugin missing: pip install -e ".[aot]"')
def test_stored_fp8_weights_feed_h100_gemms_without_a_copy():
    """Compiled deviceless for one H100: a layer stack of stored projections (one with two
    output dims, one with two input dims like o_proj) and a stack of stored experts through the
    grouped matmul multiply in e4m3, and no transpose or copy of an e4m3 array of a weight's
    size is left in the optimized HLO (the [in, out] layout had one per weight stack)."""
    from dsv3_jax.aot.audit import audit
    from dsv3_jax.aot.hlo import arrays, parse
    from dsv3_jax.aot.targets import Target
    from dsv3_jax.layers import grouped_matmul as gm
    mesh = Mesh(Target("h100", "1x1").devices(1), ("x",))
    fp8 = Precision(jnp.bfloat16, True)
    L, D, H, V, E, F, rows, tile = 3, 1024, 4, 128, 8, 256, 64, 16
    size = rows * 2 + E * tile

    def step(x, w, tile_group, used):
        dest = jnp.arange(rows, dtype=jnp.int32)
        layout = gm.GroupedLayout(dest=dest, source=gm.source_rows(dest, size),
                                  tile_group=tile_group, group_sizes=jnp.zeros((E,), jnp.int32),
                                  used_tiles=used, tile=tile, size=size)

        def layer(h, w):  # the checkpoint's tensors, as stored
            q = QuantizedWeight.from_checkpoint(w[0], w[1], out_dims=(H, V))   # [D] -> [H, V]
            o = QuantizedWeight.from_checkpoint(w[2], w[3], in_dims=(H, V))    # [H, V] -> [D]
            experts = QuantizedWeight.from_checkpoint(w[4], w[5])              # [E, F, D]
            h = project(project(h, q, 1, fp8), o, 2, fp8)
            y = gm.grouped_matmul(gm.scatter_rows(h, layout), experts, layout, jnp.bfloat16)
            return h, gm.gather_rows(y, layout)

        return jax.lax.scan(layer, x, w)

    rep = NamedSharding(mesh, P())
    shapes = [((L, H * V, D), E4M3), ((L, H * V // 128, D // 128), np.float32),
              ((L, D, H * V), E4M3), ((L, D // 128, H * V // 128), np.float32),
              ((L, E, F, D), E4M3), ((L, E, F // 128, D // 128), np.float32)]
    w = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]
    args = (jax.ShapeDtypeStruct((rows, D), jnp.bfloat16, sharding=rep), w,
            jax.ShapeDtypeStruct((size // tile,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    text = jax.jit(step).lower(*args).compile().as_text()
    assert audit(text)["matmuls"]["f8e4m3fn x f8e4m3fn"]["count"] > 0
    smallest = min(H * V * D, F * D)  # one layer's weight matrix
    relayouts = [i.line.strip()[:160] for comp in parse(text)[0].values() for i in comp
                 if i.opcode in ("transpose", "copy") and any(
                     d == "f8e4m3fn" and math.prod(s) * 2 >= smallest for d, s in arrays(i.type))]
    assert not relayouts, relayouts
