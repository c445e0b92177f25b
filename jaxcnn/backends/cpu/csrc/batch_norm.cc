// Training-mode batch normalisation (optionally fused with the ReLU after it) for XLA's CPU backend, on XLA's own
// intra-op thread pool (no OpenMP team). Built into the same library as onednn_conv.cc, though it uses no oneDNN;
// jaxcnn/backends/cpu/norm.py wraps both handlers in derivative rules.
//
// Two XLA FFI handlers; activations are channels-last, x [M, C] (every leading axis together: N * H * W rows),
// float32 or bfloat16 (x, y, dy and dx of one type); scale, bias, statistics and their gradients are float32:
//   JaxcnnNormFwd (x, scale [C], bias [C])
//       -> y = max?(0, (x - mean) * (rstd * scale) + bias), mean [C], var [C] (biased)
//   JaxcnnNormBwd (x, dy, mean [C], var [C], scale [C], bias [C])
//       -> dx, dscale [C], dbias [C]   (the gradient of the forward's y)
// with rstd = 1 / sqrt(var + epsilon). Attributes: "epsilon" (f32), "relu" (int64: 1 = the ReLU is fused),
// "threads" (int64: 0 = XLA's thread pool, anything else = the calling thread only, as when XLA runs several CPU
// devices in one process; see onednn_conv.cc).
//
// The mathematics are flax's BatchNorm's and jaxcnn's closed-form gradient (jaxcnn/backends/cpu/norm.py), all in
// float32: mean = sum(x) / M, var = sum((x - mean)^2) / M (two passes), and backward, with xhat = (x - mean) * rstd
// and dy zeroed where the ReLU's input was not positive,
//   dbias = sum(dy),  dscale = sum(dy * xhat),  dx = scale * rstd * (dy - dbias / M - xhat * dscale / M).
// The backward pass recomputes the ReLU's mask from x with the forward's own expression (`Affine`, the same code
// in both), so it is the forward's mask bit for bit and no mask is stored. bfloat16 values are widened exactly and
// y and dx are rounded once to bfloat16, to nearest even (as XLA converts).
//
// Sums: the rows are cut into a fixed number of chunks (from M and the pool's size only, so a result never depends
// on which thread ran which chunk); each chunk sums blocks of 64 rows in float32 and the blocks in double, and the
// chunks' sums are added in chunk order. The loops over channels are compiled for AVX-512 and for any x86-64 (GCC
// picks one when the library loads).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <string>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JAXCNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JAXCNN_CLONES
#endif
#define JAXCNN_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlockRows = 64;

JAXCNN_INLINE float Widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// float32 -> bfloat16, rounded to nearest even (NaN kept a NaN), as XLA converts.
JAXCNN_INLINE uint16_t Narrow(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return Widen(p[i]); }
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = Narrow(v); }

// The normalised, scaled and shifted value before the ReLU; forward and backward both use this expression.
JAXCNN_INLINE float Affine(float x, float mean, float a, float b) { return (x - mean) * a + b; }

// acc[c] += sum over rows [r0, r1) of (x[r, c] - shift[c])^power (power 1 or 2; shift null = 0).
template <typename T>
JAXCNN_INLINE void SumRowsT(const T* x, int64_t c, int64_t r0, int64_t r1, const float* shift, int power,
                           double* acc) {
  std::vector<float> block(c);
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    std::fill(block.begin(), block.end(), 0.0f);
    const int64_t b1 = std::min(r1, b0 + kBlockRows);
    for (int64_t r = b0; r < b1; ++r) {
      const T* row = x + r * c;
      if (power == 1) {
        for (int64_t j = 0; j < c; ++j) block[j] += Load(row, j);
      } else {
        for (int64_t j = 0; j < c; ++j) {
          const float d = Load(row, j) - shift[j];
          block[j] += d * d;
        }
      }
    }
    for (int64_t j = 0; j < c; ++j) acc[j] += block[j];
  }
}

template <typename T>
JAXCNN_INLINE void NormalizeRowsT(const T* x, T* y, int64_t c, int64_t r0, int64_t r1, const float* mean,
                                 const float* a, const float* b, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * c;
    T* yr = y + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float v = Affine(Load(xr, j), mean[j], a[j], b[j]);
      if (relu) v = v > 0.0f ? v : 0.0f;
      Store(yr, j, v);
    }
  }
}

// dbias and dscale partial sums over rows [r0, r1): sum(dy'), sum(dy' * xhat), dy' = dy masked by the ReLU.
template <typename T>
JAXCNN_INLINE void GradSumRowsT(const T* x, const T* dy, int64_t c, int64_t r0, int64_t r1, const float* mean,
                               const float* rstd, const float* a, const float* b, bool relu, double* dbias,
                               double* dscale) {
  std::vector<float> sb(c), ss(c);
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    std::fill(sb.begin(), sb.end(), 0.0f);
    std::fill(ss.begin(), ss.end(), 0.0f);
    const int64_t b1 = std::min(r1, b0 + kBlockRows);
    for (int64_t r = b0; r < b1; ++r) {
      const T* xr = x + r * c;
      const T* gr = dy + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const float xv = Load(xr, j);
        float g = Load(gr, j);
        if (relu && !(Affine(xv, mean[j], a[j], b[j]) > 0.0f)) g = 0.0f;
        sb[j] += g;
        ss[j] += g * ((xv - mean[j]) * rstd[j]);
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      dbias[j] += sb[j];
      dscale[j] += ss[j];
    }
  }
}

template <typename T>
JAXCNN_INLINE void GradRowsT(const T* x, const T* dy, T* dx, int64_t c, int64_t r0, int64_t r1, const float* mean,
                            const float* rstd, const float* a, const float* b, const float* k,
                            const float* mean_dbias, const float* mean_dscale, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * c;
    const T* gr = dy + r * c;
    T* out = dx + r * c;
    for (int64_t j = 0; j < c; ++j) {
      const float xv = Load(xr, j);
      float g = Load(gr, j);
      if (relu && !(Affine(xv, mean[j], a[j], b[j]) > 0.0f)) g = 0.0f;
      const float xhat = (xv - mean[j]) * rstd[j];
      Store(out, j, k[j] * (g - mean_dbias[j] - xhat * mean_dscale[j]));
    }
  }
}

// The loops above, compiled once per instruction set for each activation type (GCC dispatches when the library
// loads); the overloads pick the type.
#define JAXCNN_KERNELS(T, SUFFIX)                                                                                  \
  JAXCNN_CLONES void SumRows##SUFFIX(const T* x, int64_t c, int64_t r0, int64_t r1, const float* shift,           \
                                     int power, double* acc) {                                                    \
    SumRowsT(x, c, r0, r1, shift, power, acc);                                                                    \
  }                                                                                                               \
  JAXCNN_CLONES void NormalizeRows##SUFFIX(const T* x, T* y, int64_t c, int64_t r0, int64_t r1, const float* mean, \
                                           const float* a, const float* b, bool relu) {                           \
    NormalizeRowsT(x, y, c, r0, r1, mean, a, b, relu);                                                            \
  }                                                                                                               \
  JAXCNN_CLONES void GradSumRows##SUFFIX(const T* x, const T* dy, int64_t c, int64_t r0, int64_t r1,              \
                                         const float* mean, const float* rstd, const float* a, const float* b,    \
                                         bool relu, double* dbias, double* dscale) {                              \
    GradSumRowsT(x, dy, c, r0, r1, mean, rstd, a, b, relu, dbias, dscale);                                        \
  }                                                                                                               \
  JAXCNN_CLONES void GradRows##SUFFIX(const T* x, const T* dy, T* dx, int64_t c, int64_t r0, int64_t r1,          \
                                      const float* mean, const float* rstd, const float* a, const float* b,       \
                                      const float* k, const float* mean_dbias, const float* mean_dscale,          \
                                      bool relu) {                                                                \
    GradRowsT(x, dy, dx, c, r0, r1, mean, rstd, a, b, k, mean_dbias, mean_dscale, relu);                          \
  }                                                                                                               \
  inline void SumRows(const T* x, int64_t c, int64_t r0, int64_t r1, const float* shift, int power,               \
                      double* acc) {                                                                              \
    SumRows##SUFFIX(x, c, r0, r1, shift, power, acc);                                                             \
  }                                                                                                               \
  inline void NormalizeRows(const T* x, T* y, int64_t c, int64_t r0, int64_t r1, const float* mean,               \
                            const float* a, const float* b, bool relu) {                                          \
    NormalizeRows##SUFFIX(x, y, c, r0, r1, mean, a, b, relu);                                                     \
  }                                                                                                               \
  inline void GradSumRows(const T* x, const T* dy, int64_t c, int64_t r0, int64_t r1, const float* mean,          \
                          const float* rstd, const float* a, const float* b, bool relu, double* dbias,            \
                          double* dscale) {                                                                       \
    GradSumRows##SUFFIX(x, dy, c, r0, r1, mean, rstd, a, b, relu, dbias, dscale);                                 \
  }                                                                                                               \
  inline void GradRows(const T* x, const T* dy, T* dx, int64_t c, int64_t r0, int64_t r1, const float* mean,      \
                       const float* rstd, const float* a, const float* b, const float* k, const float* mean_dbias, \
                       const float* mean_dscale, bool relu) {                                                     \
    GradRows##SUFFIX(x, dy, dx, c, r0, r1, mean, rstd, a, b, k, mean_dbias, mean_dscale, relu);                   \
  }

JAXCNN_KERNELS(float, F32)
JAXCNN_KERNELS(uint16_t, BF16)

// Rows [0, m) cut into chunks: how many, and the rows of chunk i.
struct Chunks {
  int64_t m, count, step;
  Chunks(int64_t m, int64_t threads) : m(m) {
    const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(4 * threads, (m + 255) / 256));
    step = (m + wanted - 1) / wanted;
    count = (m + step - 1) / step;
  }
  int64_t begin(int64_t i) const { return i * step; }
  int64_t end(int64_t i) const { return std::min(m, (i + 1) * step); }
};

// Runs fn(chunk) for every chunk: on XLA's pool (threads == 0) or on this thread.
template <typename Fn>
void ForChunks(ffi::ThreadPool& pool, int64_t threads, const Chunks& chunks, const Fn& fn) {
  if (threads != 0 || chunks.count == 1) {
    for (int64_t i = 0; i < chunks.count; ++i) fn(i);
    return;
  }
  jaxcnn::ParallelFor(pool, chunks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  }, /*per_thread=*/4);
}

// Per-channel sums over every row: one double array of `c` per chunk, added in chunk order.
template <typename Fn>
std::vector<double> ChannelSums(ffi::ThreadPool& pool, int64_t threads, const Chunks& chunks, int64_t width,
                                const Fn& sum_chunk) {
  std::vector<double> partial(chunks.count * width, 0.0);
  ForChunks(pool, threads, chunks, [&](int64_t i) { sum_chunk(i, partial.data() + i * width); });
  std::vector<double> total(width, 0.0);
  for (int64_t i = 0; i < chunks.count; ++i) {
    for (int64_t j = 0; j < width; ++j) total[j] += partial[i * width + j];
  }
  return total;
}

int64_t Rows(ffi::Span<const int64_t> d) {
  int64_t m = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) m *= d[i];
  return m;
}

template <typename T>
void ForwardTyped(ffi::ThreadPool& pool, int64_t threads, const T* x, const float* scale, const float* bias, T* y,
                  float* mean, float* var, int64_t m, int64_t c, float epsilon, bool relu) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  std::vector<double> sum = ChannelSums(pool, threads, chunks, c, [&](int64_t i, double* acc) {
    SumRows(x, c, chunks.begin(i), chunks.end(i), nullptr, 1, acc);
  });
  for (int64_t j = 0; j < c; ++j) mean[j] = static_cast<float>(sum[j] / m);
  std::vector<double> sq = ChannelSums(pool, threads, chunks, c, [&](int64_t i, double* acc) {
    SumRows(x, c, chunks.begin(i), chunks.end(i), mean, 2, acc);
  });
  std::vector<float> a(c);
  for (int64_t j = 0; j < c; ++j) {
    var[j] = static_cast<float>(sq[j] / m);
    a[j] = (1.0f / std::sqrt(var[j] + epsilon)) * scale[j];
  }
  ForChunks(pool, threads, chunks, [&](int64_t i) {
    NormalizeRows(x, y, c, chunks.begin(i), chunks.end(i), mean, a.data(), bias, relu);
  });
}

template <typename T>
void BackwardTyped(ffi::ThreadPool& pool, int64_t threads, const T* x, const T* dy, const float* mean,
                   const float* var, const float* scale, const float* bias, T* dx, float* dscale, float* dbias,
                   int64_t m, int64_t c, float epsilon, bool relu) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  std::vector<float> rstd(c), a(c);
  for (int64_t j = 0; j < c; ++j) {
    rstd[j] = 1.0f / std::sqrt(var[j] + epsilon);
    a[j] = rstd[j] * scale[j];
  }
  std::vector<double> sums = ChannelSums(pool, threads, chunks, 2 * c, [&](int64_t i, double* acc) {
    GradSumRows(x, dy, c, chunks.begin(i), chunks.end(i), mean, rstd.data(), a.data(), bias, relu, acc, acc + c);
  });
  std::vector<float> mean_dbias(c), mean_dscale(c);
  for (int64_t j = 0; j < c; ++j) {
    dbias[j] = static_cast<float>(sums[j]);
    dscale[j] = static_cast<float>(sums[c + j]);
    mean_dbias[j] = dbias[j] / m;
    mean_dscale[j] = dscale[j] / m;
  }
  ForChunks(pool, threads, chunks, [&](int64_t i) {
    GradRows(x, dy, dx, c, chunks.begin(i), chunks.end(i), mean, rstd.data(), a.data(), bias, a.data(),
             mean_dbias.data(), mean_dscale.data(), relu);
  });
}

// float32 or bfloat16, the same for every activation-shaped buffer (jaxcnn's Python side guarantees it).
ffi::Error CheckTypes(std::initializer_list<ffi::DataType> types) {
  const ffi::DataType first = *types.begin();
  for (ffi::DataType t : types) {
    if ((t != ffi::DataType::F32 && t != ffi::DataType::BF16) || t != first) {
      return ffi::Error::InvalidArgument("jaxcnn batch norm: activations and their gradients must all be float32 "
                                         "or all bfloat16");
    }
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                   float epsilon, int64_t relu, int64_t threads) {
  if (auto error = CheckTypes({x.element_type(), y->element_type()}); error.failure()) return error;
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("jaxcnn batch norm: x must be [..., C]");
  const int64_t m = Rows(dims), c = dims[dims.size() - 1];
  try {
    if (x.element_type() == ffi::DataType::BF16) {
      ForwardTyped(pool, threads, static_cast<const uint16_t*>(x.untyped_data()), scale.typed_data(),
                   bias.typed_data(), static_cast<uint16_t*>(y->untyped_data()), mean->typed_data(),
                   var->typed_data(), m, c, epsilon, relu != 0);
    } else {
      ForwardTyped(pool, threads, static_cast<const float*>(x.untyped_data()), scale.typed_data(), bias.typed_data(),
                   static_cast<float*>(y->untyped_data()), mean->typed_data(), var->typed_data(), m, c, epsilon,
                   relu != 0);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn batch norm failed: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, float epsilon, int64_t relu, int64_t threads) {
  if (auto error = CheckTypes({x.element_type(), dy.element_type(), dx->element_type()}); error.failure()) {
    return error;
  }
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("jaxcnn batch norm: x must be [..., C]");
  const int64_t m = Rows(dims), c = dims[dims.size() - 1];
  try {
    if (x.element_type() == ffi::DataType::BF16) {
      BackwardTyped(pool, threads, static_cast<const uint16_t*>(x.untyped_data()),
                    static_cast<const uint16_t*>(dy.untyped_data()), mean.typed_data(), var.typed_data(),
                    scale.typed_data(), bias.typed_data(), static_cast<uint16_t*>(dx->untyped_data()),
                    dscale->typed_data(), dbias->typed_data(), m, c, epsilon, relu != 0);
    } else {
      BackwardTyped(pool, threads, static_cast<const float*>(x.untyped_data()),
                    static_cast<const float*>(dy.untyped_data()), mean.typed_data(), var.typed_data(),
                    scale.typed_data(), bias.typed_data(), static_cast<float*>(dx->untyped_data()),
                    dscale->typed_data(), dbias->typed_data(), m, c, epsilon, relu != 0);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn batch norm backward failed: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));
