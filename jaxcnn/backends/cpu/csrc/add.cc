// The elementwise sum of two activations of one shape and type, for XLA's CPU backend, on XLA's own intra-op thread
// pool: the gradient of an activation that feeds two paths (a residual block's input, read by the block's branch
// and by its shortcut; jaxcnn/backends/cpu/fan_out.py).
//
//   JaxcnnAdd (a, b) -> a + b        a, b and the sum float32, or all three bfloat16
//
// Attribute "threads" (int64): 0 = XLA's thread pool, anything else = the calling thread only (as batch_norm.cc).
// bfloat16 values are widened exactly, added in float32 and rounded once to nearest even: the bits XLA's own
// bfloat16 add gives. XLA's CPU backend emits that add 8 values at a time through the stack, converting with
// integer operations, at about 17 GB/s here; this kernel's AVX-512 loop (bfloat16_avx512.h, rounding with
// AVX512-BF16 where the CPU has it) is bound by memory instead (benchmarks/README.md). Both halves of the values go to
// the same two threads call after call (parallel_for.h), as do those of the BatchNorm calls before and after it.

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>

#include "bfloat16.h"
#include "bfloat16_avx512.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGrain = 1 << 15;  // values per piece of work (64 KB of bfloat16)

void AddF32(const float* a, const float* b, float* out, int64_t n) {
  #pragma GCC ivdep  // the arrays never overlap
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void AddBf16(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = jaxcnn::Narrow(jaxcnn::Widen(a[i]) + jaxcnn::Widen(b[i]));
}

#if defined(__x86_64__)
template <bool kCvt>
JAXCNN_AVX512 void AddBf16V(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    jaxcnn::StoreBf16<kCvt>(out + i, _mm512_add_ps(jaxcnn::LoadBf16(a + i), jaxcnn::LoadBf16(b + i)));
  }
  AddBf16(a + i, b + i, out + i, n - i);
}
#endif

void AddBf16Any(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
#if defined(__x86_64__)
  if (jaxcnn::HasAvx512()) {
    if (jaxcnn::Avx512Bf16Rounding()) return AddBf16V<true>(a, b, out, n);
    return AddBf16V<false>(a, b, out, n);
  }
#endif
  AddBf16(a, b, out, n);
}

ffi::Error Add(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               int64_t threads) {
  const ffi::DataType type = a.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) || b.element_type() != type ||
      out->element_type() != type) {
    return ffi::Error::InvalidArgument("jaxcnn add: both operands and the sum must be float32, or all bfloat16");
  }
  const int64_t n = static_cast<int64_t>(a.element_count());
  if (static_cast<int64_t>(b.element_count()) != n || static_cast<int64_t>(out->element_count()) != n) {
    return ffi::Error::InvalidArgument("jaxcnn add: the operands and the sum must have the same number of values");
  }
  auto run = [&](int64_t begin, int64_t end) {
    if (type == ffi::DataType::F32) {
      AddF32(static_cast<const float*>(a.untyped_data()) + begin, static_cast<const float*>(b.untyped_data()) + begin,
             static_cast<float*>(out->untyped_data()) + begin, end - begin);
    } else {
      AddBf16Any(static_cast<const uint16_t*>(a.untyped_data()) + begin,
                 static_cast<const uint16_t*>(b.untyped_data()) + begin,
                 static_cast<uint16_t*>(out->untyped_data()) + begin, end - begin);
    }
  };
  try {
    if (threads != 0) {
      run(0, n);
    } else {
      jaxcnn::ParallelFor(pool, n, kGrain, run);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn add: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 where the bfloat16 loops of this library round with AVX512-BF16's instruction (Avx512Bf16Rounding), else 0: for
// tests and diagnostics (jaxcnn.backends.cpu.kernels.bfloat16_rounding_instruction).
extern "C" int64_t JaxcnnAvx512Bf16Rounding() {
#if defined(__x86_64__)
  return jaxcnn::Avx512Bf16Rounding() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnAdd, Add,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Ret<ffi::AnyBuffer>()  // a + b
                                  .Attr<int64_t>("threads"));
