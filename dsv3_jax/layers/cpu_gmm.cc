// The routed experts' grouped GEMM on CPU: one BLAS GEMM per expert on its exact rows.
//
// An XLA FFI custom call (built and registered by dsv3_jax/layers/cpu_gmm.py). The operands are
// a GroupedLayout's buffers (dsv3_jax/layers/grouped_matmul.py): rows sorted by expert, group g
// holding sizes[g] rows from its start, padded with zero rows to a multiple of `tile`. Only
// the routed rows are multiplied; padding rows of the outputs are written as zeros. The GEMM is
// the one NumPy links (OpenBLAS), handed over as a function pointer by dsv3_set_blas.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
// cblas_?gemm with 64-bit (ILP64, NumPy's OpenBLAS) or 32-bit (LP64) integers
template <typename T, typename I>
using Gemm = void (*)(int, int, int, I, I, I, T, const T*, I, const T*, I, T, T*, I);
void* sgemm = nullptr;
void* dgemm = nullptr;
bool ilp64 = true;

template <typename T, typename I>
void call(void* f, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, T* c, int64_t ldc) {
  reinterpret_cast<Gemm<T, I>>(f)(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m,
                                  n, k, T(1), a, lda, b, ldb, T(0), c, ldc);
}

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, T* c, int64_t ldc) {
  void* f = sizeof(T) == 4 ? sgemm : dgemm;
  if (ilp64)
    call<T, int64_t>(f, ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
  else
    call<T, int32_t>(f, ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
}

// One expert's product. mode 0 forward: lhs [size, K], rhs [G, K, N] -> out [size, N];
// mode 1 dgrad: lhs [size, N], rhs [G, K, N] -> out [size, K] (lhs_g rhs[g]^T);
// mode 2 wgrad: lhs [size, K], rhs [size, N] -> out [G, K, N] (lhs_g^T rhs_g).
// Rows [start + rows, start + padded) of a row output are the group's padding: zeros.
template <typename T>
void group(int64_t mode, int64_t g, int64_t start, int64_t rows, int64_t padded, const T* lhs,
           const T* rhs, int64_t K, int64_t N, T* out) {
  if (mode == 0) {
    if (rows) gemm<T>(false, false, rows, N, K, lhs + start * K, K, rhs + g * K * N, N,
                      out + start * N, N);
    std::memset(out + (start + rows) * N, 0, (padded - rows) * N * sizeof(T));
  } else if (mode == 1) {
    if (rows) gemm<T>(false, true, rows, K, N, lhs + start * N, N, rhs + g * K * N, N,
                      out + start * K, K);
    std::memset(out + (start + rows) * K, 0, (padded - rows) * K * sizeof(T));
  } else if (rows) {
    gemm<T>(true, false, K, N, rows, lhs + start * K, K, rhs + start * N, N, out + g * K * N, N);
  } else {
    std::memset(out + g * K * N, 0, K * N * sizeof(T));
  }
}

// The groups of one call, claimed one at a time by the calling thread and by helpers on XLA's
// intra-op thread pool (each GEMM single-threaded). Shared with the helpers: one that starts
// after the call has returned finds nothing left to claim and touches no buffer.
struct Work {
  std::function<void(int64_t)> run;
  int64_t count = 0;
  std::atomic<int64_t> next{0}, done{0};

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      run(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename T>
void run(ffi::ThreadPool& pool, int64_t mode, int64_t tile, const T* lhs, const T* rhs,
         const int32_t* sizes, int64_t groups, int64_t size, int64_t K, int64_t N, T* out) {
  std::vector<int64_t> start(groups + 1, 0), rows(groups);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t padded = (int64_t(sizes[g]) + tile - 1) / tile * tile;
    if (start[g] + padded > size) padded = 0;  // past the buffer (not a valid layout)
    rows[g] = std::min<int64_t>(sizes[g], padded);
    start[g + 1] = start[g] + padded;
  }
  if (mode != 2) {  // rows past the last group
    int64_t width = mode == 0 ? N : K;
    std::memset(out + start[groups] * width, 0, (size - start[groups]) * width * sizeof(T));
  }
  auto work = std::make_shared<Work>();
  work->count = groups;
  work->run = [=, &start, &rows](int64_t g) {
    group<T>(mode, g, start[g], rows[g], start[g + 1] - start[g], lhs, rhs, K, N, out);
  };
  for (int64_t h = 1; h < std::min<int64_t>(pool.num_threads(), groups); ++h)
    pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < groups) std::this_thread::yield();
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                ffi::Buffer<ffi::S32> sizes, ffi::Result<ffi::AnyBuffer> out, int64_t mode,
                int64_t tile) {
  auto ld = lhs.dimensions(), rd = rhs.dimensions();
  if (mode < 0 || mode > 2 || tile < 1 || ld.size() != 2 || rd.size() != (mode == 2 ? 2 : 3) ||
      out->dimensions().size() != (mode == 2 ? 3 : 2) || sizes.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("cpu grouped gemm: bad mode, tile or operand ranks");
  int64_t size = ld[0], groups = sizes.dimensions()[0];
  int64_t K = mode == 1 ? rd[1] : ld[1];
  int64_t N = mode == 2 ? rd[1] : rd[2];
  auto t = lhs.element_type();
  if (t != rhs.element_type() || t != out->element_type())
    return ffi::Error::InvalidArgument("cpu grouped gemm: operand dtypes differ");
  if (t == ffi::F32 && sgemm)
    run<float>(pool, mode, tile, lhs.typed_data<float>(), rhs.typed_data<float>(),
               sizes.typed_data(), groups, size, K, N, out->typed_data<float>());
  else if (t == ffi::F64 && dgemm)
    run<double>(pool, mode, tile, lhs.typed_data<double>(), rhs.typed_data<double>(),
                sizes.typed_data(), groups, size, K, N, out->typed_data<double>());
  else
    return ffi::Error::InvalidArgument("cpu grouped gemm: f32 or f64 operands and BLAS only");
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3GroupedGemm, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("tile"));

// The BLAS GEMMs (cblas_sgemm, cblas_dgemm) and whether they take 64-bit integers. The caller
// sets the BLAS to one thread: the groups run in parallel on XLA's threads instead.
extern "C" void dsv3_set_blas(void* s, void* d, int is_ilp64) {
  sgemm = s;
  dgemm = d;
  ilp64 = is_ilp64 != 0;
}
