"""The grouped matmul of the routed experts, per backend: the one place that chooses its kernel.

`expert_ffn` (dsv3_jax/layers/moe.py) multiplies a tiled, expert-grouped row buffer (a
`GroupedLayout`, dsv3_jax/layers/grouped_matmul.py) by each expert's weight. Which kernel does
it depends on the backend being compiled for (the context mesh's devices, so an ahead-of-time
compile for TPU or GPU on a CPU host chooses the target's kernel):

- CPU: "blas", the custom call of dsv3_jax/layers/cpu_gmm.py: a BLAS GEMM per expert on its
  exact rows (forward, dgrad, wgrad), the experts in parallel on XLA:CPU's threads, on a
  layout of one-row tiles (no padding). Where its C++ kernel cannot be built (no compiler, no
  BLAS), "ours", the tile-chunk loop of grouped_matmul.py (XLA:CPU has no grouped GEMM; its
  `ragged_dot` is a dense [groups, rows, K] emulation).
- TPU: "ragged_dot", `jax.lax.ragged_dot_general`, which the TPU compiler keeps as its own
  grouped-GEMM kernels (`ragged-dot` custom calls) for the forward, dgrad (ragged rows) and
  wgrad (ragged contraction) alike; nothing to install, the compiler tiles it, and its cost
  analysis counts 2 x rows x K x N per product. Pallas megablox `gmm`/`tgmm` and tokamax's
  Mosaic TPU kernel compile natively too, but their `pallas_call` outputs carry no varying
  type, so they fail inside the expert-parallel `shard_map` (check_vma=True), and they add
  group-metadata ops around each call: not offered.
- GPU: "tokamax", `tokamax.ragged_dot_general` on its Pallas Mosaic GPU kernels, on Hopper
  (H100, H200) with bf16/f16 operands, when the optional extra is installed (`pip install -e
  ".[tokamax]"`); else "ours". tokamax 0.0.17's other kernels do not cover training here: its
  sm100 (B200) kernel has no ragged-contraction (wgrad) form and fails inside shard_map's
  check_vma, its sm80 kernel takes the forward form only, and fp32 operands are refused.
  XLA:GPU lowers `jax.lax.ragged_dot` by expanding it to a dense dot over [groups, rows, K]
  (groups x the useful FLOPs); its cuDNN ragged-dot fusion needs bf16 outputs, a GPU present
  at compile time and a newer cuDNN for wgrad (SCALE.md, "Native grouped GEMMs on TPU and H100").
- FP8 (block-scaled e4m3 experts, trained or as stored): always "ours". Our FP8 numerics
  quantize activations per 1 x 128 row block and weights per 128 x 128 block and rescale every
  128-wide K block's fp32 partial product (dsv3_jax/fp8.py); no platform grouped GEMM here takes
  those block scales (XLA's ragged dot has no scales; tokamax's quantized ragged dot quantizes
  weights only, per channel or sub-channel, with bf16 activations), so none is exact to them.

Every platform kernel gets the same numerics as ours: operands in `dtype`, fp32 accumulation,
the product rounded once to `out_dtype`; in the backward pass (a custom VJP) the cotangent is
cast to `dtype`, dx = dy w^T is a grouped GEMM with the ragged rows (the weight read transposed,
not copied) and dW = x^T dy a grouped GEMM with a ragged contraction, both fp32-accumulated.
Group g's operand rows are its padded size, ceil(group_sizes[g] / tile) * tile, as the layout
places them (zero padding rows add nothing); rows past the last group are set to zero in the
outputs, whatever a kernel leaves there.

`implementation("ragged_dot")` forces a kernel for everything traced inside it (tests,
benchmarks); FP8 experts stay on ours.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.fp8 import QuantizedWeight
from dsv3_jax.layers import cpu_gmm
from dsv3_jax.layers import grouped_matmul as gm
from sharding.mesh import platform as mesh_platform

IMPLEMENTATIONS = ("ours", "blas", "ragged_dot", "tokamax")
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("grouped_matmul", default=None)
# dx = dy w^T: rows ragged, w's N contracted, w's group dim picks the weight
_DGRAD = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])
# dW = x^T dy: the rows contracted and ragged, one [K, N] output per group
_WGRAD = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])
_FORWARD = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])


@contextlib.contextmanager
def implementation(name: str | None):
    """`with implementation("ragged_dot"): ...` makes every expert grouped matmul traced inside
    use that kernel (None: the platform's choice); FP8 experts stay on "ours"."""
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"grouped matmul implementation {name!r}; allowed {IMPLEMENTATIONS}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


@functools.cache
def have_tokamax() -> bool:
    """Whether the optional tokamax package imports (`pip install -e ".[tokamax]"`)."""
    try:
        import tokamax  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or broken against this jax: not used
        return False
    return True


def choose(platform: str, *, fp8: bool, dtype=jnp.bfloat16, device_kind: str = "") -> str:
    """The grouped-matmul kernel for `platform` ("cpu", "gpu", "tpu"), FP8 or not, operands in
    `dtype`, on a device of `device_kind` (a GPU's: tokamax's kernels are Hopper's); see the
    module docstring."""
    if fp8:
        return "ours"
    if platform not in ("tpu", "gpu"):
        return "blas" if cpu_gmm.available() else "ours"
    if platform == "tpu":
        return "ragged_dot"
    hopper = re.search(r"\bG?H(100|200|800|20)\b", device_kind) is not None
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "tokamax" if hopper and half and have_tokamax() else "ours"


def _platform() -> str:
    """The backend being compiled for: the context mesh's devices, else JAX's default backend."""
    return mesh_platform(jax.sharding.get_abstract_mesh())


def _device_kind() -> str:
    """The compile target's device kind: the context mesh's, else JAX's first device's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "device_kind", None) or jax.devices()[0].device_kind


def current(*, fp8: bool, dtype=jnp.bfloat16) -> str:
    """The kernel a grouped matmul with operands in `dtype` traced now uses: the forced one,
    else the compile target's choice."""
    if fp8:
        return "ours"
    return _FORCED.get() or choose(_platform(), fp8=False, dtype=dtype,
                                   device_kind=_device_kind())


def layout_tile(impl: str) -> int | None:
    """The tile of the expert-grouped layout `impl` runs on: one row for "blas" (it multiplies
    exact rows, so padding would only grow the buffer, its row gathers and the SwiGLU between
    the products), else None (`grouped_matmul.choose_tile`: tiles near the mean group size)."""
    return 1 if impl == "blas" else None


def padded_group_sizes(layout: gm.GroupedLayout) -> Int[Array, "groups"]:
    """Rows each group occupies in the layout's buffer: its routed rows rounded up to the tile."""
    return gm.padded_sizes(layout.group_sizes, layout.tile)


def grouped_matmul(x: Float[Array, "size k"], w: Float[Array, "groups k n"],
                   layout: gm.GroupedLayout, dtype, out_dtype=None, impl: str | None = None, *,
                   fp8: bool = False) -> Float[Array, "size n"]:
    """Group g's rows of `x` times `w[g]`, operands in `dtype`, fp32 accumulation, the product
    in `out_dtype` (default `dtype`), by `impl` (default: `current`); FP8 (`fp8`, or stored
    `QuantizedWeight` experts) runs on ours."""
    out_dtype = out_dtype or dtype
    fp8 = fp8 or isinstance(w, QuantizedWeight)
    impl = "ours" if fp8 else (impl or current(fp8=False, dtype=dtype))
    if impl == "ours":
        return gm.grouped_matmul(x, w, layout, dtype, fp8, out_dtype)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"grouped matmul implementation {impl!r}; allowed {IMPLEMENTATIONS}")
    if impl == "tokamax" and not have_tokamax():
        raise ValueError('grouped matmul "tokamax": the package is not installed '
                         '(pip install -e ".[tokamax]")')
    if impl == "blas" and not cpu_gmm.available():
        raise ValueError(f'grouped matmul "blas": {cpu_gmm.unavailable_reason()}')
    x, w = x.astype(dtype), w.astype(dtype)
    # Inside shard_map, x and w get the same varying axes before the custom VJP (as in
    # grouped_matmul.py): the implicit broadcasts transpose to the psums of dx over tensor
    # shards and of dW over batch shards.
    x, w = _vary_like(x, w), _vary_like(w, x)
    sizes = _vary_like(layout.group_sizes.astype(jnp.int32), x)
    return _platform_gmm(x, w, sizes, impl, jnp.dtype(out_dtype).name, _platform(), layout.tile)


def _vary_like(x, *deps):
    """`x` typed as varying over the shard_map axes of `deps` too (a select on a constant False
    adds no arithmetic on `deps`, which may hold inf); unchanged where it already is."""
    for d in deps:
        have, need = _varying(x), _varying(d)
        if have is None or need is None or not need <= have:
            x = x + jnp.where(False, d.reshape(-1)[0], 0).astype(x.dtype)
    return x


def _varying(a) -> frozenset | None:
    """The shard_map axes `a` varies over (jax 0.12: `manual_axis_type.varying`; earlier:
    `vma`); None when this JAX says neither."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    vma = getattr(t, "vma", None)
    return None if vma is None else frozenset(vma)


def _rows_in_groups(y, sizes):
    """`y` with the rows past the last group set to zero (kernels may leave them unwritten)."""
    return jnp.where((jnp.arange(y.shape[0]) < sizes.sum())[:, None], y, jnp.zeros((), y.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _platform_gmm(x, w, group_sizes, impl, out_dtype, platform, tile):
    return _ragged(impl, platform, tile, x, w, group_sizes, "forward").astype(out_dtype)


def _platform_gmm_fwd(x, w, group_sizes, impl, out_dtype, platform, tile):
    return (_platform_gmm(x, w, group_sizes, impl, out_dtype, platform, tile),
            (x, w, group_sizes))


def _platform_gmm_bwd(impl, out_dtype, platform, tile, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = _ragged(impl, platform, tile, dy, w, group_sizes, "dgrad").astype(x.dtype)
    dw = _ragged(impl, platform, tile, x, dy, group_sizes, "wgrad").astype(w.dtype)
    return dx, dw, None


_platform_gmm.defvjp(_platform_gmm_fwd, _platform_gmm_bwd)


def _ragged(impl: str, platform: str, tile: int, lhs, rhs, group_sizes, form: str) -> jax.Array:
    """One fp32-accumulated grouped GEMM (`form`: forward, dgrad or wgrad) by `impl` over a
    layout's buffers (groups of `group_sizes` rows, each padded to a multiple of `tile`); the
    rows past the last group zero; inside shard_map typed as varying like its operands (a
    kernel's custom call may drop that type)."""
    if impl == "blas":  # the exact rows only; it writes the padding rows as zeros
        return _vary_like(cpu_gmm.grouped_gemm(lhs, rhs, group_sizes, tile, form), lhs, rhs)
    f32 = jnp.float32
    sizes = gm.padded_sizes(group_sizes, tile)  # with their padding rows
    dims = {"forward": _FORWARD, "dgrad": _DGRAD, "wgrad": _WGRAD}[form]
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot_general(lhs, rhs, sizes, dims, preferred_element_type=f32)
    else:  # tokamax
        import tokamax
        # its Mosaic GPU kernel named for a GPU target (tokamax's own choice asks the default
        # device, the CPU in an ahead-of-time compile); elsewhere its XLA reference (its Mosaic
        # TPU kernel fails under shard_map's check_vma, like megablox: module docstring)
        kernel = "mosaic_gpu" if platform == "gpu" else "xla"
        out = tokamax.ragged_dot_general(lhs, rhs, sizes, dims, preferred_element_type=f32,
                                         implementation=kernel)
    if form != "wgrad":
        out = _rows_in_groups(out, sizes)
    return _vary_like(out, lhs, rhs)
