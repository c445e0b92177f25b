// Float32 matrix products for XLA's CPU backend: oneDNN's sgemm, one call per block of the result's rows, the
// blocks run on XLA's own intra-op thread pool with one OpenMP thread each (no OpenMP team to wake, none left
// spinning next to XLA's threads). Built into the same library as onednn_conv.cc; jaxcnn/nn/onednn.py wraps it
// in a JAX primitive with exact derivative rules.
//
// One XLA FFI handler, row-major operands:
//   JaxcnnMatmul (a, b) -> c = op(a) @ op(b), with op(a) [M, K] (a [M, K], or [K, M] when "transpose_a" is 1)
//   and op(b) [K, N] (b [K, N], or [N, K] when "transpose_b" is 1); c [M, N].

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "onednn_common.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
  // Rows [r0, r1) of c: rows r0.. of op(a), i.e. a's rows (a + r0 * lda) or, transposed, its columns (a + r0).
  try {
    jaxcnn::ParallelFor(pool, m, 16, [&](int64_t r0, int64_t r1) {
      jaxcnn::SetThreads(1);
      const float* a_rows = transpose_a ? ap + r0 : ap + r0 * lda;
      dnnl_status_t status = dnnl_sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', r1 - r0, n, k, 1.0f,
                                        a_rows, lda, bp, ldb, 0.0f, cp + r0 * n, n);
      if (status != dnnl_success) {
        throw std::runtime_error("dnnl_sgemm failed with status " + std::to_string(static_cast<int>(status)));
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
