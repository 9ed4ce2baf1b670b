"""The per-backend grouped matmul of the routed experts (dsv3_jax/layers/platform_gmm.py).

Every kernel that runs on CPU is checked against a float64 NumPy oracle and against ours,
forward and both gradients, on a layout with empty groups, padding rows and unused rows; the
choice per platform; expert_ffn on CPU is ours bit for bit; the expert-parallel path and FP8
experts follow the choice; and the real TPU / GPU compilers (compile-only, in a fresh process)
turn the expert-parallel forward + backward into native grouped GEMMs with no dense expansion.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.layers import cpu_gmm
from dsv3_jax.layers import grouped_matmul as gm
from dsv3_jax.layers.grouped_ffn import grouped_ffn
from dsv3_jax.layers import platform_gmm
from dsv3_jax.layers.linear import Precision
from dsv3_jax.layers.moe import expert_ffn
from sharding import make_mesh
from sharding.expert_parallel import ExpertParallelDispatcher
from tests.conftest import ROOT

KERNELS = [pytest.param("blas", marks=pytest.mark.skipif(
    not cpu_gmm.available(), reason=f"the CPU grouped GEMM kernel: {cpu_gmm.unavailable_reason()}")),
           "ragged_dot", pytest.param("tokamax", marks=pytest.mark.skipif(
    not platform_gmm.have_tokamax(), reason='tokamax missing: pip install -e ".[tokamax]"'))]
G, K, N, ROWS, TILE = 6, 24, 20, 40, 8


def _problem(seed=0):
    """Rows of groups 0, 1, 3, 5 (2 and 4 empty) in a tiled layout, x, w and a cotangent dy."""
    rng = np.random.default_rng(seed)
    ids = rng.choice([0, 1, 3, 5], size=ROWS)
    layout = gm.make_layout(jnp.asarray(ids, jnp.int32), G, tile=TILE)
    x = rng.standard_normal((ROWS, K))
    w = rng.standard_normal((G, K, N))
    dy = rng.standard_normal((ROWS, N))
    return ids, layout, x, w, dy


def _oracle(ids, x, w, dy):
    """float64: y = x_r w[g_r]; dx = dy_r w[g_r]^T; dW[g] = sum over g's rows of x_r^T dy_r."""
    y = np.einsum("rk,rkn->rn", x, w[ids])
    dx = np.einsum("rn,rkn->rk", dy, w[ids])
    dw = np.zeros_like(w)
    np.add.at(dw, ids, np.einsum("rk,rn->rkn", x, dy))
    return y, dx, dw


def _run(impl, layout, x, w, dy, dtype=jnp.float32, out_dtype=None):
    """(y, dx, dW) of the grouped matmul on the tiled buffer, read back per routed row (and
    the whole buffers, to check padding and unused rows)."""
    xb = gm.scatter_rows(jnp.asarray(x, dtype), layout)
    dyb = gm.scatter_rows(jnp.asarray(dy, dtype), layout)
    f = lambda xb, w: platform_gmm.grouped_matmul(xb, w, layout, dtype, out_dtype, impl)  # noqa: E731
    yb, vjp = jax.vjp(f, xb, jnp.asarray(w, jnp.float32))
    dxb, dw = vjp(dyb.astype(yb.dtype))
    return yb, dxb, dw


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_matches_float64_oracle_and_ours(impl):
    ids, layout, x, w, dy = _problem()
    assert int((layout.group_sizes == 0).sum()) == 2 and layout.size > int(
        platform_gmm.padded_group_sizes(layout).sum()) > ROWS  # empty groups, padding, unused
    y, dx, dw = _oracle(ids, x, w, dy)
    got = _run(impl, layout, x, w, dy)
    ours = _run("ours", layout, x, w, dy)
    for name, a, b, want in zip(("y", "dx"), got[:2], ours[:2], (y, dx)):
        rows = np.asarray(gm.gather_rows(a, layout))
        np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(rows, np.asarray(gm.gather_rows(b, layout)), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
        used = np.zeros(layout.size, bool)
        used[np.asarray(layout.dest)] = True
        assert np.all(np.asarray(a)[~used] == 0), name  # padding and unused rows: zero
    np.testing.assert_allclose(np.asarray(got[2]), dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ours[2]), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[2])[[2, 4]] == 0)  # empty groups get no gradient


@pytest.mark.parametrize("impl", KERNELS)
def test_bf16_operands_fp32_output_round_like_ours(impl):
    """bf16 operands, fp32 accumulation, an fp32 output (the tensor-split partial sums) and
    bf16 gradients: the same roundings as ours, so equal up to fp32 summation order."""
    ids, layout, x, w, dy = _problem(1)
    got = _run(impl, layout, x, w, dy, jnp.bfloat16, jnp.float32)
    ours = _run("ours", layout, x, w, dy, jnp.bfloat16, jnp.float32)
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.bfloat16
    for a, b in zip(got, ours):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ours[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_gmm.available() or not hasattr(jax, "enable_x64"),
                    reason="no CPU grouped GEMM kernel, or no jax.enable_x64")
def test_blas_kernel_in_float64_is_the_oracle():
    """float64 operands run on the BLAS dgemm: every form equals the float64 oracle to 1e-12."""
    ids, layout, x, w, dy = _problem(2)
    y, dx, dw = _oracle(ids, x, w, dy)
    with jax.enable_x64(True):
        xb, dyb = (gm.scatter_rows(jnp.asarray(a), layout) for a in (x, dy))
        s, t = layout.group_sizes, layout.tile
        got = (cpu_gmm.grouped_gemm(xb, jnp.asarray(w), s, t, "forward"),
               cpu_gmm.grouped_gemm(dyb, jnp.asarray(w), s, t, "dgrad"),
               cpu_gmm.grouped_gemm(xb, dyb, s, t, "wgrad"))
        assert all(g.dtype == jnp.float64 for g in got)
        rows = [np.asarray(gm.gather_rows(g, layout)) for g in got[:2]]
    for a, b in zip(rows + [np.asarray(got[2])], (y, dx, dw)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_blas_kernel_build_errors_name_the_cause(monkeypatch, tmp_path):
    """No compiler, or a compile error: `build` says so (the compiler's own message), and
    nothing half-written is left in the cache; a good build lands in $XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if cpu_gmm._compiler() is not None:
        lib = cpu_gmm.build()
        assert lib.parent == tmp_path / "dsv3_jax" and lib.stat().st_size > 0
        broken = tmp_path / "broken.cc"
        broken.write_text("this is not C++;\n")
        monkeypatch.setattr(cpu_gmm, "_SOURCE", broken)
        with pytest.raises(RuntimeError, match="broken.cc"):
            cpu_gmm.build()
        assert [p.name for p in (tmp_path / "dsv3_jax").iterdir()] == [lib.name]
    monkeypatch.setattr(cpu_gmm, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        cpu_gmm.build()


def test_choice_per_platform(monkeypatch):
    cpu = "blas" if cpu_gmm.available() else "ours"
    assert platform_gmm.choose("cpu", fp8=False) == cpu
    assert platform_gmm.choose("tpu", fp8=False) == "ragged_dot"
    for platform in ("cpu", "tpu", "gpu"):
        assert platform_gmm.choose(platform, fp8=True) == "ours"
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200 141GB HBM3e"
    monkeypatch.setattr(platform_gmm, "have_tokamax", lambda: True)
    for kind in (h100, h200, "NVIDIA GH200 480GB"):
        assert platform_gmm.choose("gpu", fp8=False, device_kind=kind) == "tokamax"
    # tokamax's kernels cover training on Hopper in bf16/f16 only; never XLA:GPU's dense ragged dot
    assert platform_gmm.choose("gpu", fp8=False, dtype=jnp.float32, device_kind=h100) == "ours"
    for kind in ("NVIDIA B200", "NVIDIA A100-SXM4-80GB", ""):
        assert platform_gmm.choose("gpu", fp8=False, device_kind=kind) == "ours"
    monkeypatch.setattr(platform_gmm, "have_tokamax", lambda: False)
    assert platform_gmm.choose("gpu", fp8=False, device_kind=h100) == "ours"
    assert platform_gmm.current(fp8=False) == cpu  # this process: CPU
    with platform_gmm.implementation("ragged_dot"):
        assert platform_gmm.current(fp8=False) == "ragged_dot"
        assert platform_gmm.current(fp8=True) == "ours"
    with pytest.raises(ValueError, match="allowed"):
        with platform_gmm.implementation("megablox"):
            pass
    monkeypatch.setattr(cpu_gmm, "available", lambda: False)  # no compiler or BLAS: ours
    assert platform_gmm.choose("cpu", fp8=False) == "ours"
    assert platform_gmm.layout_tile("blas") == 1 and platform_gmm.layout_tile("ours") is None


def _ffn_inputs(seed=0, d=16, f=12):
    ids, layout, _, _, _ = _problem(seed)
    rng = np.random.default_rng(seed + 1)
    x = gm.scatter_rows(jnp.asarray(rng.standard_normal((ROWS, d)), jnp.float32), layout)
    ws = tuple(jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
               for s in ((G, d, f), (G, d, f), (G, f, d)))
    return layout, x, ws


def test_expert_ffn_with_ours_is_the_fused_tile_loop_bit_for_bit_and_blas_agrees():
    """expert_ffn with ours is the fused tile loop of grouped_ffn.py exactly (itself equal to
    the three grouped_matmul.py products, tests/test_grouped_ffn.py); with the CPU BLAS kernel
    (the CPU default where it builds) it agrees up to fp32 summation order, gradients too."""
    layout, x, ws = _ffn_inputs()
    p = Precision(jnp.float32, False)

    def old(ws, x):
        return grouped_ffn(x, *ws, layout, jnp.float32)

    loss = lambda f: lambda ws, x: jnp.sum(jnp.sin(f(ws, x)))  # noqa: E731
    new = lambda ws, x: expert_ffn(ws, x, layout, p)  # noqa: E731
    want = jax.tree.leaves(jax.value_and_grad(loss(old), (0, 1))(ws, x))
    with platform_gmm.implementation("ours"):
        for a, b in zip(jax.tree.leaves(jax.value_and_grad(loss(new), (0, 1))(ws, x)), want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if not cpu_gmm.available():
        pytest.skip(f"the CPU grouped GEMM kernel: {cpu_gmm.unavailable_reason()}")
    with platform_gmm.implementation(None):
        assert "ffi_call" in _primitives(jax.grad(loss(new)), ws, x)
        for a, b in zip(jax.tree.leaves(jax.value_and_grad(loss(new), (0, 1))(ws, x)), want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _primitives(fn, *args) -> set[str]:
    names = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            names.add(e.primitive.name)
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def test_forced_kernel_reaches_expert_ffn_and_fp8_stays_ours():
    layout, x, ws = _ffn_inputs()
    grad = lambda p: jax.grad(lambda ws: jnp.sum(expert_ffn(ws, x, layout, p)))  # noqa: E731
    with platform_gmm.implementation("ragged_dot"):
        assert "ragged_dot_general" in _primitives(grad(Precision(jnp.float32, False)), ws)
        fp8 = _primitives(grad(Precision(jnp.float32, True)), ws)
    assert "ragged_dot_general" not in fp8
    with platform_gmm.implementation(None):
        assert "ragged_dot_general" not in _primitives(grad(Precision(jnp.float32, False)), ws)


@pytest.mark.parametrize("impl,spec", [("ragged_dot", "data=2,expert=4"),
                                       ("ragged_dot", "data=2,tensor=2,expert=2"),
                                       pytest.param("blas", "data=2,tensor=2,expert=2",
                                                    marks=pytest.mark.skipif(
                                                        not cpu_gmm.available(),
                                                        reason="no CPU grouped GEMM kernel"))])
def test_expert_parallel_dispatch_with_a_platform_kernel_matches_ours(impl, spec):
    """The expert-parallel dispatcher (shard_map, check_vma=True) with the forced kernel: outputs
    and gradients (x and the three weight stacks, summed over batch and tensor shards) equal
    the same dispatch on ours."""
    mesh = make_mesh(spec)
    rng = np.random.default_rng(0)
    t, d, f, e, k = 64, 32, 16, 8, 3
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    experts = jnp.asarray(np.argsort(rng.random((t, e)), -1)[:, :k], jnp.int32)
    ws = tuple(jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
               for s in ((e, d, f), (e, d, f), (e, f, d)))
    dispatch = ExpertParallelDispatcher(mesh)

    def loss(x, ws):
        routed = types.SimpleNamespace(precision=Precision(jnp.float32, False), weights=ws)
        y, counts, dropped = dispatch(x, experts, routed, e)
        return jnp.sum(jnp.sin(y)), (y, counts, dropped)

    def run(impl):
        with jax.set_mesh(mesh), platform_gmm.implementation(impl):
            return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, ws)

    (l1, (y1, c1, d1)), g1 = run(impl)
    (l0, (y0, c0, d0)), g0 = run("ours")
    assert int(d1) == 0 and np.array_equal(np.asarray(c1), np.asarray(c0))
    for a, b in zip(jax.tree.leaves((y1, g1)), jax.tree.leaves((y0, g0))):  # fp32 sum order
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


# ------------------------------------------------------------------ the real compilers
PROBE = """
import json, sys, types
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from dsv3_jax.aot.audit import audit
from dsv3_jax.aot.targets import parse_target
from dsv3_jax.layers.linear import Precision
from sharding import make_mesh
from sharding.expert_parallel import ExpertParallelDispatcher

mesh = make_mesh("data=2,expert=4", devices=parse_target(sys.argv[1], 8).devices(8))
T, D, F, E, K = 512, 256, 256, 16, 4
dispatch = ExpertParallelDispatcher(mesh)

def loss(x, experts, *ws):
    routed = types.SimpleNamespace(precision=Precision(jnp.bfloat16, False), weights=ws)
    return jnp.sum(dispatch(x, experts, routed, E)[0].astype(jnp.float32) ** 2)

def sds(shape, dtype, *spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

rows = ("data", "fsdp", "expert")
args = (sds((T, D), jnp.bfloat16, rows), sds((T, K), jnp.int32, rows),
        sds((E, D, F), jnp.float32, "expert"), sds((E, D, F), jnp.float32, "expert"),
        sds((E, F, D), jnp.float32, "expert"))
with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(*args).compile().as_text()
recv = 4 * (T // 8) * min(K, E // 4)  # routed rows one device receives (ep x capacity)
dense = sorted({s for s in __import__("re").findall(r"\\[(\\d+),(\\d+),(\\d+)\\]", text)
                if int(s[0]) == E // 4 and int(s[1]) >= recv})  # [local experts, rows, *]
print(json.dumps(dict(grouped=audit(text)["grouped_gemms"], dense_buffers=dense)))
"""


def _probe(target: str) -> dict:
    from dsv3_jax.aot.targets import parse_target
    env = dict(os.environ, **parse_target(target, 8).environ(8))
    proc = subprocess.run([sys.executable, "-c", PROBE, target], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu missing: pip install -e ".[aot]"')
def test_tpu_compiles_expert_parallel_grouped_matmuls_to_native_kernels():
    """Forward + backward of the expert-parallel experts (bf16, 4 local experts) for a TPU v5p
    slice: 3 forward, 3 dgrad and 3 wgrad grouped-GEMM kernels, no dense expansion and no
    [local experts, rows, *] buffer."""
    out = _probe("tpu-v5p:2x2x2")
    assert out["grouped"] == dict(forward=3, recomputed=0, backward=6, unattributed=0,
                                  wgrad=3, dense=0, dense_flops=0.0), out
    assert out["dense_buffers"] == [], out


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None
                    or not platform_gmm.have_tokamax(),
                    reason='the CUDA plugin or tokamax is missing: pip install -e ".[aot,tokamax]"')
def test_h100_compiles_expert_parallel_grouped_matmuls_to_native_kernels():
    """The same on 8 H100s (XLA:GPU deviceless): tokamax's Mosaic GPU kernels."""
    out = _probe("h100:1x8")
    assert out["grouped"] == dict(forward=3, recomputed=0, backward=6, unattributed=0,
                                  wgrad=3, dense=0, dense_flops=0.0), out
    assert out["dense_buffers"] == [], out


GROUPED_HLO = """%sc_add (a: s32[], b: s32[]) -> s32[] {
  %a = s32[] parameter(0)
  %b = s32[] parameter(1)
  ROOT %s = s32[] add(%a, %b)
}, execution_thread="sparsecore"

%body (p: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {
  %p = (s32[], bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[64,32]{1,0} get-tuple-element(%p), index=1
  %w = bf16[4,32,16]{2,1,0} constant({...})
  %gs = s32[4]{0} constant({16, 16, 16, 16})
  %fwd = f32[64,16]{1,0} custom-call(%gs, %x, %w), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/jvp()/while/body/ragged_dot_general/ragged-dot-none"}, backend_config={"custom_call_config": {"cost_estimate":{"flops":"65536","transcendentals":"0"}}}
  %re = f32[64,16]{1,0} custom-call(%gs, %x, %w), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/transpose(jvp())/while/body/checkpoint/rematted_computation/ragged_dot_general/ragged-dot-none"}
  %dy = bf16[64,16]{1,0} convert(%re)
  %dx = f32[64,32]{1,0} custom-call(%gs, %dy, %w), custom_call_target="tpu_custom_call", metadata={op_name="ragged-dot-none"}
  %copy = f32[64,32]{1,0} copy(%dx)
  %dxb = bf16[64,32]{1,0} convert(%copy), metadata={op_name="jit(f)/transpose(jvp())/while/body/convert_element_type"}
  %dw = f32[4,32,16]{2,1,0} custom-call(%gs, %x, %dy), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/transpose(jvp())/while/body/ragged_dot_general/ragged-dot-none"}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[64,32]{1,0}) tuple(%n, %dxb)
}

%cond (q: (s32[], bf16[64,32])) -> pred[] {
  %q = (s32[], bf16[64,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %five = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %five), direction=LT
}

ENTRY %main (x.1: bf16[64,32], e: bf16[256,32], w2: bf16[32,16]) -> bf16[64,32] {
  %x.1 = bf16[64,32]{1,0} parameter(0)
  %e = bf16[256,32]{1,0} parameter(1)
  %w2 = bf16[32,16]{1,0} parameter(2)
  %expanded = f32[256,16]{1,0} dot(%e, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp()/ragged_dot_general"}
  %zero = s32[] constant(0)
  %init = (s32[], bf16[64,32]{1,0}) tuple(%zero, %x.1)
  %loop = (s32[], bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[64,32]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_audit_counts_grouped_gemms_of_a_handwritten_module():
    """A loop of 5 trips after a SparseCore computation (whose end line names its thread: the
    reader used to run on into the next computations), holding a forward, a recomputed, a
    nameless dgrad (attributed through a copy to its backward user) and a wgrad kernel; a dot
    carrying a ragged dot's name outside it is a dense expansion."""
    from dsv3_jax.aot.audit import audit, step_flops
    a = audit(GROUPED_HLO)
    assert a["grouped_gemms"] == dict(forward=5, recomputed=5, backward=10, unattributed=0,
                                      wgrad=5, dense=1, dense_flops=2 * 256 * 16 * 32)
    per_row = 2 * 32 * 16  # every kernel here: 2 x K x N = 1024 per row
    f = a["flops"]
    assert f["grouped_per_row"] == 4 * 5 * per_row and f["recomputed_per_row"] == 5 * per_row
    assert f["grouped"] == 4 * 5 * 64 * per_row and f["matmuls"] == 2 * 256 * 16 * 32
    assert step_flops(a, routed_rows=10) == (f["matmuls"] + 20 * per_row * 10, 5 * per_row * 10)
