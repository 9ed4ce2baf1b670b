"""The routed experts' grouped GEMM on CPU: a BLAS GEMM per expert on its exact rows.

XLA:CPU has no grouped GEMM: ours (dsv3_jax/layers/grouped_matmul.py) multiplies whole tiles,
so an expert's rows are padded to a multiple of the tile (a third more FLOPs at 96 rows per
expert and 64-row tiles), and each tile gathers its expert's weights. PyTorch's CPU grouped mm
is a loop of GEMMs over each expert's exact rows. This is that loop as an XLA FFI custom call
(`cpu_gmm.cc`), calling the GEMM of the BLAS NumPy ships (OpenBLAS): forward
(rows x w[g]), dgrad (rows x w[g]^T) and wgrad (rows^T x rows), fp32 or fp64 operands, on a
GroupedLayout's buffers (padding rows skipped, and written as zeros). The experts' GEMMs run in
parallel on XLA:CPU's intra-op threads, each single-threaded: the BLAS is set to one thread in
this process (OpenBLAS's own threads, spinning between many small GEMMs, ran the 64-expert
products 2-6x slower), which also makes NumPy's matmuls here single-threaded.

The kernel is compiled on first use with the system C++ compiler ($CXX, else c++) against the
FFI headers jaxlib ships, and cached in $XDG_CACHE_HOME/dsv3_jax (keyed by the source, jaxlib
and compiler). Where that fails (no compiler, no BLAS found in NumPy's libraries or the
system's), `available()` is False, says why once in the log, and dsv3_jax/layers/platform_gmm.py
keeps ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

_SOURCE = Path(__file__).with_suffix(".cc")
_TARGET = "dsv3_grouped_gemm"
FORMS = {"forward": 0, "dgrad": 1, "wgrad": 2}
# (sgemm, dgemm, 64-bit integers): NumPy's OpenBLAS wheels, then a system CBLAS
_BLAS_SYMBOLS = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),
                 ("cblas_sgemm64_", "cblas_dgemm64_", True),
                 ("cblas_sgemm", "cblas_dgemm", False))
_SET_THREADS = (("scipy_openblas_set_num_threads64_", ctypes.c_int),
                ("openblas_set_num_threads64_", ctypes.c_int),
                ("openblas_set_num_threads", ctypes.c_int))
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsv3_jax"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX", "c++"), "g++", "clang++"):
        if path := shutil.which(name):
            return path
    return None


def build() -> Path:
    """The compiled kernel library (built once per source, jaxlib and compiler; cached)."""
    import jaxlib
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    key = hashlib.sha256(_SOURCE.read_bytes() + jaxlib.__version__.encode() + cxx.encode())
    out = _cache_dir() / f"cpu_gmm-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # atomic: concurrent builds race
        lib = Path(tmp) / out.name
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
               str(_SOURCE), "-o", str(lib)]
        _log.info("building the CPU grouped GEMM kernel (once): %s", " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(lib, out)
    return out


def _blas_libraries() -> list[str]:
    """NumPy's bundled BLAS (Linux and macOS wheels), then the system's."""
    root = Path(np.__file__).parent
    found = sorted(glob.glob(str(root.parent / "numpy.libs" / "*openblas*")))
    found += sorted(glob.glob(str(root / ".dylibs" / "*openblas*")))
    for name in ("openblas", "cblas", "blas"):
        if path := ctypes.util.find_library(name):
            found.append(path)
    return found


def _find_blas() -> tuple[int, int, bool]:
    """Addresses of a CBLAS sgemm and dgemm, and whether they take 64-bit integers; the BLAS is
    set to one thread (the kernel runs its groups in parallel on XLA's threads)."""
    for path in _blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for s, d, ilp64 in _BLAS_SYMBOLS:
            if hasattr(lib, s) and hasattr(lib, d):
                for name, int_type in _SET_THREADS:
                    if hasattr(lib, name):
                        getattr(lib, name).argtypes = [int_type]
                        getattr(lib, name)(1)
                        break
                addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
                return addr(getattr(lib, s)), addr(getattr(lib, d)), ilp64
    raise RuntimeError(f"no CBLAS sgemm/dgemm in {_blas_libraries() or 'NumPy or the system'}")


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernel; None, or why it is not available."""
    try:
        lib = ctypes.CDLL(str(build()))
        sgemm, dgemm, ilp64 = _find_blas()
        lib.dsv3_set_blas(ctypes.c_void_p(sgemm), ctypes.c_void_p(dgemm), ctypes.c_int(ilp64))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.Dsv3GroupedGemm),
                                    platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure: fall back to ours, saying why
        _log.warning("the CPU grouped GEMM kernel is not available (%s); the routed experts use "
                     "the tile loop of grouped_matmul.py", e)
        return str(e)
    return None


def available() -> bool:
    """Whether the kernel is built, its BLAS found and it is registered with XLA:CPU."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def grouped_gemm(lhs: Float[Array, "size a"], rhs: Float[Array, "..."],
                 group_sizes: Int[Array, "groups"], tile: int, form: str) -> Float[Array, "..."]:
    """One grouped GEMM over a layout's buffers (group g: group_sizes[g] rows from the sum of the
    earlier groups' sizes rounded up to `tile`), accumulated in fp32 (fp64 for fp64 operands):

        forward  lhs [size, K], rhs [groups, K, N] -> [size, N]     rows_g @ rhs[g]
        dgrad    lhs [size, N], rhs [groups, K, N] -> [size, K]     rows_g @ rhs[g]^T
        wgrad    lhs [size, K], rhs [size, N]      -> [groups, K, N] lhs_g^T @ rhs_g

    Other dtypes are multiplied as fp32 (exact products of bf16 or fp16 operands)."""
    if not available():
        raise RuntimeError(f"the CPU grouped GEMM kernel is not available: {unavailable_reason()}")
    dtype = jnp.float64 if lhs.dtype == jnp.float64 and rhs.dtype == jnp.float64 else jnp.float32
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    size, groups = lhs.shape[0], group_sizes.shape[0]
    if form == "forward":
        shape = (size, rhs.shape[2])
    elif form == "dgrad":
        shape = (size, rhs.shape[1])
    elif form == "wgrad":
        shape = (groups, lhs.shape[1], rhs.shape[1])
    else:
        raise ValueError(f"grouped GEMM form {form!r}; allowed {tuple(FORMS)}")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(shape, dtype),
                            vmap_method="sequential")  # under vmap: one call per element
    return call(lhs, rhs, group_sizes.astype(jnp.int32), mode=np.int64(FORMS[form]),
                tile=np.int64(tile))


def main() -> int:
    """Build the kernel now (scripts/setup.sh does) and say which grouped GEMM the routed
    experts use on CPU."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if available():
        print(f"cpu_gmm: the routed experts run on the BLAS grouped GEMM on CPU ({build()})")
        return 0
    print(f"cpu_gmm: not available ({unavailable_reason()}); the routed experts run on the "
          "pure-XLA tile loop on CPU (slower)")
    return 1
