// Float32 matrix products for XLA's CPU backend: oneDNN's sgemm, one call per block of the result's rows, the
// blocks run on XLA's own intra-op thread pool with one OpenMP thread each (no OpenMP team to wake, none left
// spinning next to XLA's threads). Built into the same library as onednn_conv.cc; jaxcnn/nn/onednn.py wraps it
// in a JAX primitive with exact derivative rules.
//
// One XLA FFI handler, row-major operands:
//   JaxcnnMatmul (a, b) -> c = op(a) @ op(b), with op(a) [M, K] (a [M, K], or [K, M] when "transpose_a" is 1)
//   and op(b) [K, N] (b [K, N], or [N, K] when "transpose_b" is 1); c [M, N].

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>
#include <exception>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "onednn_common.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// How many parts to split the depth (K) of a product into, one per thread, instead of splitting its rows: 1 unless
// op(b) is large and the depth at least twice the rows. A row split has every thread read all of op(b); splitting
// the depth has each read only its share of op(b)'s rows, the same share of a weight matrix that the thread writes
// in the row-split filter gradient (op(a) transposed, rows = the depth here) and that the SGD update rewrites
// (parallel_for.h). The MLP's 784x300 weight (940 KB) read whole by both cores left its cache lines shared by
// both, and every write of the update then had to take them from the other core (benchmarks/README.md).
int64_t DepthParts(ffi::ThreadPool& pool, int64_t m, int64_t n, int64_t k) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads <= 1 || k < 2 * m || k * n < (int64_t{1} << 17)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(threads, k / 64));
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, int64_t transpose_a, int64_t transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxcnn matmul: operands must be matrices");
  }
  const int64_t m = cd[0], n = cd[1], k = transpose_a ? ad[0] : ad[1];
  if ((transpose_a ? ad[1] : ad[0]) != m || (transpose_b ? bd[1] : bd[0]) != k ||
      (transpose_b ? bd[0] : bd[1]) != n) {
    return ffi::Error::InvalidArgument("jaxcnn matmul: operand shapes do not match the result");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = c->typed_data();
  const int64_t lda = ad[1], ldb = bd[1];
  auto sgemm = [&](int64_t rows, int64_t depth, const float* a_part, const float* b_part, float* out) {
    jaxcnn::SetThreads(1);
    dnnl_status_t status = dnnl_sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', rows, n, depth, 1.0f,
                                      a_part, lda, b_part, ldb, 0.0f, out, n);
    if (status != dnnl_success) {
      throw std::runtime_error("dnnl_sgemm failed with status " + std::to_string(static_cast<int>(status)));
    }
  };
  const int64_t parts = DepthParts(pool, m, n, k);
  try {
    if (parts <= 1) {
      // Rows [r0, r1) of c: rows r0.. of op(a), i.e. a's rows (a + r0 * lda) or, transposed, its columns (a + r0).
      jaxcnn::ParallelFor(pool, m, 16, [&](int64_t r0, int64_t r1) {
        sgemm(r1 - r0, k, transpose_a ? ap + r0 : ap + r0 * lda, bp, cp + r0 * n);
      }, /*per_thread=*/1);
      return ffi::Error::Success();
    }
    // Depth [k0, k1) of part p: op(a)'s columns k0.. (a + k0, or transposed its rows: a + k0 * lda) times op(b)'s
    // rows k0.. (b + k0 * ldb, or transposed its columns: b + k0). Part 0 writes c, part p > 0 scratch p - 1.
    std::unique_ptr<float[]> scratch(new float[(parts - 1) * m * n]);
    std::vector<int64_t> one_each(parts + 1);
    for (int64_t p = 0; p <= parts; ++p) one_each[p] = p;
    jaxcnn::ParallelForGroups(pool, one_each, [&](int64_t p) {
      const int64_t k0 = p * k / parts, k1 = (p + 1) * k / parts;
      sgemm(m, k1 - k0, transpose_a ? ap + k0 * lda : ap + k0, transpose_b ? bp + k0 : bp + k0 * ldb,
            p == 0 ? cp : scratch.get() + (p - 1) * m * n);
    });
    // c = part 0 + part 1 + ..., added in that order whichever thread sums a row.
    jaxcnn::ParallelFor(pool, m * n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t p = 1; p < parts; ++p) {
        const float* s = scratch.get() + (p - 1) * m * n;
        for (int64_t i = i0; i < i1; ++i) cp[i] += s[i];
      }
    }, /*per_thread=*/1);
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn matmul: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transpose_a")
                                  .Attr<int64_t>("transpose_b"));
