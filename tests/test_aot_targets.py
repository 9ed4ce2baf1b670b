"""The real TPU and GPU compilers as AOT targets (dsv3_jax/aot/), and the HLO audit.

The compile tests run `python -m dsv3_jax.aot --target ...` in fresh processes: libtpu's TPU v5p
slices and XLA:GPU's deviceless H100 hosts, compiled on this CPU-only machine. They need the
compiler packages (`pip install -e ".[aot]"`, which .ci/run installs).
"""

import concurrent.futures
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


def test_a_missing_compiler_names_the_install_line(monkeypatch):
    import importlib.util as iu
    from dsv3_jax.aot import targets
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name in (
        "libtpu", "jax_plugins.xla_cuda12") else real(name, *a))
    targets.gpu_target_config.cache_clear()
    with pytest.raises(TargetError, match=r'libtpu\) is not installed: pip install -e ".\[aot\]"'):
        parse_target("tpu-v5p", 8).devices(8)
    with pytest.raises(TargetError, match=r'CUDA plugin\) is not installed: pip install -e ".\[aot\]"'):
        gpu_target_config("NVIDIA H100 80GB HBM3")
    targets.gpu_target_config.cache_clear()


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
  %kernel = f32[8,16]{1,0} custom-call(%x.1), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "TUxJUg==",
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="jit(f)/splash_attention"}
  %ar = f32[8,16]{1,0} all-reduce-start(%x.1), replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%add, backend_config={"collective_backend_config":{"is_sync":true}}
  %ard = f32[8,16]{1,0} all-reduce-done(%ar)
  %gemm = (f32[64,256]{1,0}, s8[1024]{0}) custom-call(%l, %r), custom_call_target="__cublas$lt$matmul$f8", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_audit_of_a_handwritten_module():
    """Trip counts from the loop condition, async wrappers, is_sync, the three replica-group
    notations and a cuBLAS FP8 GEMM call, against numbers worked out by hand; a TPU kernel's
    backend_config printed over three lines (one starting with "}}") ends nothing."""
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


@needs["tpu"]
def test_audit_matmul_flops_equal_the_tpu_compilers_count_without_loops(monkeypatch):
    """The TPU compiler writes dots as convolutions (batch dims as dilated windows); the audit's
    FLOPs for them equal the compiler's own cost analysis on a loop-free program (forward and
    gradients of plain, per-head and attention-like einsums), to its elementwise remainder."""
    from dsv3_jax.aot.targets import Target
    for k, v in Target("tpu-v5p", "1x1x1").environ(1).items():
        if k != "XLA_FLAGS":
            monkeypatch.setenv(k, v)
    from jax.sharding import Mesh
    mesh = Mesh(Target("tpu-v5p", "1x1x1").devices(1), ("x",))
    rep = NamedSharding(mesh, P())

    def loss(x, w, v, e):
        h = jnp.einsum("bsd,df->bsf", x, w)
        g = jnp.einsum("bsf,hfk->bhsk", h, v)
        q = jnp.einsum("bhsk,btk->bhst", g, e)
        return (q.astype(jnp.float32) ** 2).sum()

    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rep)
            for s in ((4, 256, 512), (512, 1024), (8, 1024, 64), (4, 128, 64))]
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    a = audit.audit(compiled.as_text(), compiled.cost_analysis())
    assert a["matmuls"]["bf16 x bf16"]["without_flops"] == 0
    assert math.isclose(audit.matmul_flops(a), a["cost"]["flops"], rel_tol=0.01)


# ------------------------------------------------------------------------------- compiles
def _compile_all(*runs):
    """Compile each (config, mesh, target, *args) in its own `python -m dsv3_jax.aot`, two at a
    time (a compile keeps about one core busy)."""
    def one(run):
        config, mesh, target, *rest = run
        return aot.run_subprocess(["--config", config, "--mesh", mesh, "--target", target, *rest],
                                  timeout=900)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, runs))


def _assert_expert_exchange_is_ragged_and_async(r):
    ragged = r["audit"]["collectives"]["ragged-all-to-all"]
    assert ragged["count"] > 0 and ragged["asynchronous"] > 0, (r["target"], r["audit"]["collectives"])


KINDS = {"tpu-v5p": "TPU v5", "h100": "NVIDIA H100 80GB HBM3"}
TRAIN, SERVE = ["--batch", "16", "--seq", "64"], ["--batch", "16", "--seq", "64", "--serve"]
V2_TRAIN = ["--batch", "8", "--seq", "1024", "--capacity-factor", "1.25"]
# every compile of the default run, longest first, so that two at a time keep both cores busy
RUNS = {("fp8", "h100"): (TINY, "expert=8", "h100", *TRAIN, "--precision", "fp8"),
        ("pipeline", "tpu-v5p"): (TINY, "pipeline=2,expert=4", "tpu-v5p", *TRAIN),
        ("decode", "h100"): (TINY, "expert=8", "h100", *SERVE)}
# the same steps for the other target, and V2-Lite (its TPU compile alone takes ~4 CPU-minutes):
# slow (CI time), `pytest -m slow` compiles them; tests/test_platform_gmm.py compiles the
# expert-parallel grouped GEMMs for both targets by default
SLOW_RUNS = {("v2", "tpu-v5p"): (V2, "expert=8", "tpu-v5p", *V2_TRAIN),
             ("v2", "h100"): (V2, "expert=8", "h100", *V2_TRAIN),
             ("pipeline", "h100"): (TINY, "pipeline=2,expert=4", "h100", *TRAIN),
             ("decode", "tpu-v5p"): (TINY, "expert=8", "tpu-v5p", *SERVE)}


def _compiled(runs):
    if not (HAVE_TPU and HAVE_GPU):
        pytest.skip('the TPU and GPU compilers are missing: pip install -e ".[aot]"')
    return dict(zip(runs, _compile_all(*runs.values())))


@pytest.fixture(scope="module")
def compiled():
    return _compiled(RUNS)


@pytest.fixture(scope="module")
def compiled_slow():
    return _compiled(SLOW_RUNS)


def test_tiny_pipeline_train_and_decode_steps_compile_for_tpu_v5p_and_h100(compiled):
    """GPipe over 2 stages with 4-way expert parallelism inside them (TPU v5p slice), and the
    decode step with 8-way expert parallelism (8-GPU H100 host): the expert exchange is an
    asynchronous ragged all-to-all on both, and the training state is donated."""
    _check_pipeline_and_decode(compiled)


@pytest.mark.slow
def test_tiny_pipeline_and_decode_steps_on_the_other_target(compiled_slow):
    """The same checks with the targets swapped: pipeline on H100, decode on TPU v5p."""
    _check_pipeline_and_decode(compiled_slow)


def _check_pipeline_and_decode(compiled):
    for (step, target), r in compiled.items():
        if step not in ("pipeline", "decode"):
            continue
        assert r["kind"] == ("train" if step == "pipeline" else "decode")
        assert r["target"].startswith(target) and r["device_kind"] == KINDS[target]
        _assert_expert_exchange_is_ragged_and_async(r)
        assert r["audit"]["matmuls"], "no matmul found in the HLO"
        if step == "pipeline":
            assert r["alias"] >= 0.99 * r["argument"]  # the state is donated


def test_fp8_train_step_on_an_expert_parallel_mesh_multiplies_in_e4m3_on_h100(compiled):
    r = compiled["fp8", "h100"]
    fp8_dots = r["audit"]["matmuls"]["f8e4m3fn x f8e4m3fn"]
    assert fp8_dots["count"] > 0 and fp8_dots["flops"] > r["audit"]["matmuls"]["bf16 x bf16"]["flops"]
    _assert_expert_exchange_is_ragged_and_async(r)


@pytest.mark.slow
def test_v2_lite_train_step_compiles_and_the_planner_is_within_15_percent(compiled_slow):
    """The real V2-Lite train step (16B parameters, 8-way expert parallelism, capacity factor
    1.25, bf16 compute) for 8 TPU v5p chips and 8 H100s: the planner's per-device total is
    within 15% of each compiler's, the step's inputs are exactly the planner's state, and the
    routed experts are native grouped GEMMs."""
    _check_v2_lite(compiled_slow)


def _check_v2_lite(compiled):
    for (step, target), r in compiled.items():
        if step != "v2":
            continue
        _assert_expert_exchange_is_ragged_and_async(r)
        assert math.isclose(r["planner"]["total"], r["total"], rel_tol=0.15), (
            r["target"], r["planner"], r["total"])
        parts = r["planner"]["parts"]
        assert np.isclose(parts["params"] + parts["optimizer"], r["argument"], rtol=1e-3)
        # the routed experts run as native grouped GEMMs, forward, dgrad and wgrad, none expanded
        # densely (dsv3_jax/layers/platform_gmm.py): on TPU always, on H100 with tokamax installed
        if target == "tpu-v5p" or importlib.util.find_spec("tokamax"):
            g = r["audit"]["grouped_gemms"]
            assert g["forward"] > 0 and g["backward"] > 0 and g["wgrad"] > 0, (target, g)
            assert g["dense"] == 0, (target, g)
