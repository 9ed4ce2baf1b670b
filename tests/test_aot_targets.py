"""The real TPU and GPU compilers as AOT targets (dsv3_jax/aot/), and the HLO audit.

The compile tests run `python -m dsv3_jax.aot --target ...` in fresh processes: libtpu's TPU v5p
slices and XLA:GPU's deviceless H100 hosts, compiled on this CPU-only machine. They need the
compiler packages (`pip install -e ".[aot]"`, which .ci/run installs).
"""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax import aot, plan
from dsv3_jax.aot import audit
from dsv3_jax.aot.targets import TargetError, gpu_target_config, parse_target

from conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.json")
V2 = str(ROOT / "configs" / "deepseek-v2-lite.json")
HAVE_TPU = importlib.util.find_spec("libtpu") is not None
HAVE_GPU = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs = {"tpu": pytest.mark.skipif(not HAVE_TPU, reason='libtpu missing: pip install -e ".[aot]"'),
         "gpu": pytest.mark.skipif(not HAVE_GPU, reason='jax-cuda12-plugin missing: pip install -e ".[aot]"')}


# ------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("text, devices, spec, count", [
    ("tpu-v5p", 64, "tpu-v5p:4x4x4", 64), ("tpu-v5p", 8, "tpu-v5p:2x2x2", 8),
    ("tpu-v4", 16, "tpu-v4:2x2x2", 16),  # two TensorCores (devices) per v4 chip
    ("tpu-v5e", 256, "tpu-v5e:16x16", 256), ("tpu-v6e:4x8", 32, "tpu-v6e:4x8", 32),
    ("h100", 8, "h100:1x8", 8), ("h100", 256, "h100:32x8", 256), ("H200:2x4", 8, "h200:2x4", 8),
    ("b200", 4, "b200:1x4", 4), ("cpu", 64, "cpu", None)])
def test_targets_parse_and_default_to_the_standard_topology(text, devices, spec, count):
    t = parse_target(text, devices)
    assert t.spec == spec and t.device_count == count


@pytest.mark.parametrize("text, devices, words", [
    ("tpu-v9", 8, "unknown target 'tpu-v9'"), ("tpu-v5p", 24, "no standard tpu-v5p slice has 24"),
    ("tpu-v5p:4x4", 16, "expected 3 chip counts"), ("h100:8x8", 32, "has 64 devices but the mesh has 32"),
    ("h100", 12, "not whole hosts of 8"), ("cpu:2x2", 4, "takes no topology")])
def test_bad_targets_say_what_is_wrong(text, devices, words):
    with pytest.raises(TargetError, match=words):
        parse_target(text, devices)


def test_planner_device_follows_the_target():
    assert parse_target("h200", 8).planner_device == "h200"
    assert parse_target("tpu-v5p", 8).planner_device == "tpu-v5p"
    for name in ("h100", "h200", "b200", "a100", "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e"):
        assert parse_target(name, 8 if name != "tpu-v5e" else 4).planner_device in plan.DEVICES


@needs["gpu"]
def test_gpu_target_configs_come_from_the_plugin():
    text = gpu_target_config("NVIDIA H100 80GB HBM3")
    assert "device_memory_size: 84942979072" in text and "major: 9" in text
    assert 'device_description_str: "NVIDIA H200 141GB HBM3e"' in gpu_target_config("NVIDIA H200 141GB HBM3e")


# ------------------------------------------------------------------------------- audit
ADD = """%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
"""
SYNTHETIC = ADD + """
%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %a2a = f32[8,16]{1,0} all-to-all(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%n, %a2a)
}

%cond (q: (s32[], f32[8,16])) -> pred[] {
  %q = (s32[], f32[8,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %six = s32[] constant(6)
  ROOT %lt = pred[] compare(%j, %six), direction=LT
}

%wrapped (w: bf16[4,32]) -> bf16[16,32] {
  %w = bf16[4,32]{1,0} parameter(0)
  ROOT %ag = bf16[16,32]{1,0} all-gather(%w), replica_groups=[2,4]<=[8], dimensions={0}, metadata={op_name="jit(f)/gather_weight"}
}

ENTRY %main (x.1: f32[8,16], w.1: bf16[4,32], l: f8e4m3fn[64,128], r: f8e4m3fn[128,256]) -> f32[8,16] {
  %x.1 = f32[8,16]{1,0} parameter(0)
  %w.1 = bf16[4,32]{1,0} parameter(1)
  %l = f8e4m3fn[64,128]{1,0} parameter(2)
  %r = f8e4m3fn[128,256]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %x.1)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  %as = ((bf16[4,32]{1,0}), bf16[16,32]{1,0}) async-start(%w.1), calls=%wrapped
  %ad = bf16[16,32]{1,0} async-done(%as)
  %ar = f32[8,16]{1,0} all-reduce-start(%x.1), replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%add, backend_config={"collective_backend_config":{"is_sync":true}}
  %ard = f32[8,16]{1,0} all-reduce-done(%ar)
  %gemm = (f32[64,256]{1,0}, s8[1024]{0}) custom-call(%l, %r), custom_call_target="__cublas$lt$matmul$f8", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_audit_of_a_handwritten_module():
    """Trip counts from the loop condition, async wrappers, is_sync, the three replica-group
    notations and a cuBLAS FP8 GEMM call, against numbers worked out by hand."""
    a = audit.audit(SYNTHETIC)
    c = a["collectives"]
    # all-to-all in a 6-trip loop, groups of 4: 512 bytes in, 3/4 of them sent, 6 times
    assert c["all-to-all"] == dict(count=6, asynchronous=0, bytes=6 * 384)
    # all-gather wrapped in async-start, groups of 4 ([2,4]<=[8]): 256 bytes to 3 peers
    assert c["all-gather"] == dict(count=1, asynchronous=1, bytes=768)
    # all-reduce-start marked is_sync: synchronous; group 'b' = 4; ring: 2 * 512 * 3/4
    assert c["all-reduce"] == dict(count=1, asynchronous=0, bytes=768)
    assert a["largest_all_gather"]["bytes"] == 1024
    assert a["largest_all_gather"]["op_name"] == "jit(f)/gather_weight"
    assert a["matmuls"] == {"f8e4m3fn x f8e4m3fn": dict(count=1, flops=2 * 64 * 256 * 128,
                                                        without_flops=0)}
    assert a["unbounded_loops"] == 0 and a["cost"] is None


def test_audit_of_an_xla_cpu_compile():
    """A compiled program with a scanned all-to-all, an all-gather and a dot: counts, bytes and
    FLOPs from the audit equal what the program does."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(c, _):
        return jax.lax.all_to_all(c, "x", 0, 0, tiled=True) * 2, None

    def local(a, w):
        a = jax.lax.scan(body, a, None, length=5)[0]
        full = jax.lax.all_gather(w, "x", tiled=True)          # [64, 96] gathered
        return a, jnp.dot(a[:, :64], full, preferred_element_type=jnp.float32)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x")),
                              out_specs=(P("x"), P("x"))))
    a = jax.ShapeDtypeStruct((8 * 16, 64), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((64, 96), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    compiled = f.lower(a, w).compile()
    r = audit.audit(compiled.as_text(), compiled.cost_analysis())
    c = r["collectives"]
    assert c["all-to-all"]["count"] == 5
    assert c["all-to-all"]["bytes"] == 5 * 16 * 64 * 4 * 7 // 8
    assert c["all-gather"]["count"] == 1 and c["all-gather"]["bytes"] == 8 * 96 * 4 * 7
    assert r["largest_all_gather"]["bytes"] == 64 * 96 * 4
    assert r["matmuls"]["f32 x f32"]["flops"] == 2 * 16 * 64 * 96
    assert r["cost"]["flops"] > 0


# ------------------------------------------------------------------------------- compiles
def _compile(config, mesh, target, *rest):
    return aot.run_subprocess(["--config", config, "--mesh", mesh, "--target", target, *rest],
                              timeout=900)


def _assert_expert_exchange_is_ragged_and_async(r):
    ragged = r["audit"]["collectives"]["ragged-all-to-all"]
    assert ragged["count"] > 0 and ragged["asynchronous"] > 0, r["audit"]["collectives"]


TARGETS = [pytest.param("tpu-v5p", marks=needs["tpu"]), pytest.param("h100", marks=needs["gpu"])]


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_train_and_decode_steps_compile_with_ragged_expert_exchange(target):
    r = _compile(TINY, "expert=8", target, "--batch", "16", "--seq", "64")
    assert r["kind"] == "train" and r["target"].startswith(target)
    kind = "TPU v5" if target == "tpu-v5p" else "NVIDIA H100 80GB HBM3"
    assert r["device_kind"] == kind
    assert r["alias"] >= 0.99 * r["argument"]  # the state is donated
    _assert_expert_exchange_is_ragged_and_async(r)
    d = _compile(TINY, "expert=8", target, "--batch", "16", "--seq", "64", "--serve")
    assert d["kind"] == "decode"
    _assert_expert_exchange_is_ragged_and_async(d)


@needs["gpu"]
def test_tiny_pipeline_train_step_compiles_for_h100_in_bf16():
    """GPipe over 2 stages with expert parallelism inside them; on a GPU the stages exchange
    bf16 (the fp32 crossing is XLA:CPU's workaround only): collective-permutes of bf16."""
    r = _compile(TINY, "pipeline=2,expert=4", "h100", "--batch", "16", "--seq", "64")
    _assert_expert_exchange_is_ragged_and_async(r)
    assert r["audit"]["matmuls"]["bf16 x bf16"]["count"] > 0


@pytest.mark.parametrize("target", TARGETS)
def test_v2_lite_train_step_compiles_and_the_planner_is_within_15_percent(target):
    r = _compile(V2, "expert=8", target, "--batch", "8", "--seq", "1024",
                 "--capacity-factor", "1.25")
    _assert_expert_exchange_is_ragged_and_async(r)
    assert math.isclose(r["planner"]["total"], r["total"], rel_tol=0.15), (r["planner"], r["total"])
    parts = r["planner"]["parts"]
    assert np.isclose(parts["params"] + parts["optimizer"], r["argument"], rtol=1e-3)
