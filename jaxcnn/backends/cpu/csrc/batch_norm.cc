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
// and the same with a residual r added before the ReLU (a residual block's last BatchNorm, its shortcut and the
// ReLU after the sum in one pass):
//   JaxcnnNormAddFwd (x, scale, bias, r) -> y = max?(0, (x - mean) * (rstd * scale) + bias + r), mean, var
//   JaxcnnNormAddBwd (x, dy, mean, var, scale, bias, r) -> dx, dscale, dbias, dr (= dy where the ReLU passed it)
// with rstd = 1 / sqrt(var + epsilon). Attributes: "epsilon" (f32), "relu" (int64: 1 = the ReLU is fused),
// "threads" (int64: 0 = XLA's thread pool, anything else = the calling thread only, as when XLA runs several CPU
// devices in one process; see onednn_conv.cc).
//
// The mathematics are flax's BatchNorm's and jaxcnn's closed-form gradient (jaxcnn/backends/cpu/norm.py) in
// float32. Statistics in one pass over x: with d = x - shift (per channel, the mean of 64 rows spread over x), the
// pass sums d and d^2, then mean = shift + sum(d) / M and var = sum(d^2) / M - (sum(d) / M)^2 (biased); the shift,
// close to the mean, keeps the cancellation to a few bits where |mean| >> std (flax's unshifted mean(x^2) - mean^2
// loses most digits there). Backward, with xhat = (x - mean) * rstd and dy zeroed where the ReLU's input was not
// positive,
//   dbias = sum(dy),  dscale = sum(dy * xhat),  dx = scale * rstd * (dy - dbias / M - xhat * dscale / M).
// The backward pass recomputes the ReLU's mask from x (and r) with the forward's own expression (`Affine`, the same
// code in both), so it is the forward's mask bit for bit and no mask is stored. bfloat16 values are widened exactly and
// y and dx are rounded once to bfloat16, to nearest even (as XLA converts).
//
// Sums: the rows are cut into a fixed number of chunks (from M and the pool's size only, so a result never depends
// on which thread ran which chunk); each chunk sums blocks of 64 rows in float32 and the blocks in double, and the
// chunks' sums are added in chunk order. The loops are compiled for AVX-512, AVX2 and any x86-64 (GCC picks one when
// the library loads).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <string>
#include <vector>

#include "bfloat16.h"
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

constexpr int64_t kBlockRows = 64;   // rows summed in float32 before a double add
constexpr int64_t kTileValues = 256;  // values per tile of whole rows (see MomentRowsT)
constexpr int64_t kShiftRows = 64;    // rows whose mean shifts the one-pass moments (see ShiftNearMean)

using jaxcnn::Narrow;
using jaxcnn::Widen;

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return Widen(p[i]); }
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = Narrow(v); }

// The normalised, scaled and shifted value before the ReLU; forward and backward both use this expression.
JAXCNN_INLINE float Affine(float x, float mean, float a, float b) { return (x - mean) * a + b; }

// The loops below run over tiles of R whole rows (R * C contiguous values, R = max(1, 256 / C)) with the
// per-channel parameters repeated R times, so that a layer with few channels (C = 16) still gets one long
// vectorised loop instead of a 16-value loop per row. Sums are kept per tile position and folded to C channels in
// a fixed order.

// Two sums per tile position: in float32 over a block of rows (b1, b2), in double over the blocks (t1, t2), then
// folded to the c channels.
struct TwoSums {
  std::vector<float> b1, b2;
  std::vector<double> t1, t2;
  explicit TwoSums(int64_t width) : b1(width), b2(width), t1(width, 0.0), t2(width, 0.0) {}
  void StartBlock() {
    std::fill(b1.begin(), b1.end(), 0.0f);
    std::fill(b2.begin(), b2.end(), 0.0f);
  }
  void EndBlock() {
    for (size_t k = 0; k < b1.size(); ++k) {
      t1[k] += b1[k];
      t2[k] += b2[k];
    }
  }
  void Fold(int64_t c, double* out1, double* out2) const {
    for (size_t k = 0; k < t1.size(); ++k) {
      out1[k % c] += t1[k];
      out2[k % c] += t2[k];
    }
  }
};

// s1[c] += sum over rows [r0, r1) of d, s2[c] += sum of d^2, with d = x[r, c] - shift[c] (shift: tiled).
template <typename T>
JAXCNN_INLINE void MomentRowsT(const T* x, int64_t c, int64_t tile, int64_t r0, int64_t r1, const float* shift,
                               double* s1, double* s2) {
  const int64_t block_rows = tile * std::max<int64_t>(1, kBlockRows / tile);
  TwoSums sums(tile * c);
  float* b1 = sums.b1.data();
  float* b2 = sums.b2.data();
  for (int64_t r0b = r0; r0b < r1; r0b += block_rows) {
    sums.StartBlock();
    const int64_t r1b = std::min(r1, r0b + block_rows);
    for (int64_t r = r0b; r < r1b; r += tile) {
      const T* p = x + r * c;
      const int64_t n = std::min(tile, r1b - r) * c;
      #pragma GCC ivdep  // the arrays never overlap
      for (int64_t k = 0; k < n; ++k) {
        const float d = Load(p, k) - shift[k];
        b1[k] += d;
        b2[k] += d * d;
      }
    }
    sums.EndBlock();
  }
  sums.Fold(c, s1, s2);
}

// The value before the ReLU at flat index k of a tile: Affine(x), plus the residual's value (kResidual).
template <bool kResidual, typename T>
JAXCNN_INLINE float PreActivation(const T* xp, const T* rp, int64_t k, const float* mean, const float* a,
                                  const float* b) {
  const float v = Affine(Load(xp, k), mean[k], a[k], b[k]);
  if constexpr (kResidual) return v + Load(rp, k);
  return v;
}

template <bool kResidual, bool kRelu, typename T>
JAXCNN_INLINE void NormalizeRowsT(const T* x, const T* res, T* y, int64_t c, int64_t tile, int64_t r0, int64_t r1,
                                  const float* mean, const float* a, const float* b) {
  for (int64_t r = r0; r < r1; r += tile) {
    const T* xp = x + r * c;
    const T* rp = res ? res + r * c : nullptr;
    T* yp = y + r * c;
    const int64_t n = std::min(tile, r1 - r) * c;
    #pragma GCC ivdep  // the arrays never overlap
    for (int64_t k = 0; k < n; ++k) {
      float v = PreActivation<kResidual>(xp, rp, k, mean, a, b);
      if constexpr (kRelu) v = v > 0.0f ? v : 0.0f;
      Store(yp, k, v);
    }
  }
}

// dbias and dscale partial sums over rows [r0, r1): sum(dy'), sum(dy' * xhat), dy' = dy masked by the ReLU.
template <bool kResidual, bool kRelu, typename T>
JAXCNN_INLINE void GradSumRowsT(const T* x, const T* res, const T* dy, int64_t c, int64_t tile, int64_t r0,
                                int64_t r1, const float* mean, const float* rstd, const float* a, const float* b,
                                double* dbias, double* dscale) {
  const int64_t block_rows = tile * std::max<int64_t>(1, kBlockRows / tile);
  TwoSums sums(tile * c);
  float* sb = sums.b1.data();
  float* ss = sums.b2.data();
  for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
    sums.StartBlock();
    const int64_t b1 = std::min(r1, b0 + block_rows);
    for (int64_t r = b0; r < b1; r += tile) {
      const T* xp = x + r * c;
      const T* rp = res ? res + r * c : nullptr;
      const T* gp = dy + r * c;
      const int64_t n = std::min(tile, b1 - r) * c;
      #pragma GCC ivdep  // the arrays never overlap
      for (int64_t k = 0; k < n; ++k) {
        const float xv = Load(xp, k);
        float g = Load(gp, k);
        if constexpr (kRelu) g = PreActivation<kResidual>(xp, rp, k, mean, a, b) > 0.0f ? g : 0.0f;
        sb[k] += g;
        ss[k] += g * ((xv - mean[k]) * rstd[k]);
      }
    }
    sums.EndBlock();
  }
  sums.Fold(c, dbias, dscale);
}

// dx of the rows [r0, r1), and dres (the residual's gradient: dy where the ReLU passed it) when dres is given.
template <bool kResidual, bool kRelu, typename T>
JAXCNN_INLINE void GradRowsT(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t c, int64_t tile,
                             int64_t r0, int64_t r1, const float* mean, const float* rstd, const float* a,
                             const float* b, const float* mean_dbias, const float* mean_dscale) {
  for (int64_t r = r0; r < r1; r += tile) {
    const T* xp = x + r * c;
    const T* rp = res ? res + r * c : nullptr;
    const T* gp = dy + r * c;
    T* out = dx + r * c;
    T* dres_p = dres ? dres + r * c : nullptr;
    const int64_t n = std::min(tile, r1 - r) * c;
    #pragma GCC ivdep  // the arrays never overlap
    for (int64_t k = 0; k < n; ++k) {
      const float xv = Load(xp, k);
      float g = Load(gp, k);
      if constexpr (kRelu) g = PreActivation<kResidual>(xp, rp, k, mean, a, b) > 0.0f ? g : 0.0f;
      const float xhat = (xv - mean[k]) * rstd[k];
      Store(out, k, a[k] * (g - mean_dbias[k] - xhat * mean_dscale[k]));
      if constexpr (kResidual) Store(dres_p, k, g);
    }
  }
}

// The loops above, compiled once per instruction set for each activation type (GCC dispatches when the library
// loads), each specialised for with / without a residual and a ReLU (so no test is left inside a loop); the
// overloads pick the type.
#define JAXCNN_SPECIALISE(KERNEL, ...)              \
  if (res && relu) {                                \
    KERNEL<true, true>(__VA_ARGS__);                \
  } else if (res) {                                 \
    KERNEL<true, false>(__VA_ARGS__);               \
  } else if (relu) {                                \
    KERNEL<false, true>(__VA_ARGS__);               \
  } else {                                          \
    KERNEL<false, false>(__VA_ARGS__);              \
  }

#define JAXCNN_KERNELS(T, SUFFIX)                                                                                  \
  JAXCNN_CLONES void MomentRows##SUFFIX(const T* x, int64_t c, int64_t tile, int64_t r0, int64_t r1,              \
                                        const float* shift, double* s1, double* s2) {                             \
    MomentRowsT(x, c, tile, r0, r1, shift, s1, s2);                                                               \
  }                                                                                                               \
  JAXCNN_CLONES void NormalizeRows##SUFFIX(const T* x, const T* res, T* y, int64_t c, int64_t tile, int64_t r0,   \
                                           int64_t r1, const float* mean, const float* a, const float* b,         \
                                           bool relu) {                                                           \
    JAXCNN_SPECIALISE(NormalizeRowsT, x, res, y, c, tile, r0, r1, mean, a, b);                                   \
  }                                                                                                               \
  JAXCNN_CLONES void GradSumRows##SUFFIX(const T* x, const T* res, const T* dy, int64_t c, int64_t tile,          \
                                         int64_t r0, int64_t r1, const float* mean, const float* rstd,            \
                                         const float* a, const float* b, bool relu, double* dbias,                \
                                         double* dscale) {                                                        \
    JAXCNN_SPECIALISE(GradSumRowsT, x, res, dy, c, tile, r0, r1, mean, rstd, a, b, dbias, dscale);               \
  }                                                                                                               \
  JAXCNN_CLONES void GradRows##SUFFIX(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t c,           \
                                      int64_t tile, int64_t r0, int64_t r1, const float* mean, const float* rstd, \
                                      const float* a, const float* b, const float* mean_dbias,                    \
                                      const float* mean_dscale, bool relu) {                                      \
    JAXCNN_SPECIALISE(GradRowsT, x, res, dy, dx, dres, c, tile, r0, r1, mean, rstd, a, b, mean_dbias,            \
                      mean_dscale);                                                                               \
  }                                                                                                               \
  inline void MomentRows(const T* x, int64_t c, int64_t tile, int64_t r0, int64_t r1, const float* shift,       \
                         double* s1, double* s2) {                                                                \
    MomentRows##SUFFIX(x, c, tile, r0, r1, shift, s1, s2);                                                        \
  }                                                                                                               \
  inline void NormalizeRows(const T* x, const T* res, T* y, int64_t c, int64_t tile, int64_t r0, int64_t r1,     \
                            const float* mean, const float* a, const float* b, bool relu) {                       \
    NormalizeRows##SUFFIX(x, res, y, c, tile, r0, r1, mean, a, b, relu);                                          \
  }                                                                                                               \
  inline void GradSumRows(const T* x, const T* res, const T* dy, int64_t c, int64_t tile, int64_t r0, int64_t r1, \
                          const float* mean, const float* rstd, const float* a, const float* b, bool relu,        \
                          double* dbias, double* dscale) {                                                        \
    GradSumRows##SUFFIX(x, res, dy, c, tile, r0, r1, mean, rstd, a, b, relu, dbias, dscale);                      \
  }                                                                                                               \
  inline void GradRows(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t c, int64_t tile, int64_t r0, \
                       int64_t r1, const float* mean, const float* rstd, const float* a, const float* b,          \
                       const float* mean_dbias, const float* mean_dscale, bool relu) {                            \
    GradRows##SUFFIX(x, res, dy, dx, dres, c, tile, r0, r1, mean, rstd, a, b, mean_dbias, mean_dscale, relu);     \
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

// Rows per tile (see the loops above) and a per-channel array repeated that many times.
int64_t TileRows(int64_t c) { return std::max<int64_t>(1, kTileValues / c); }

std::vector<float> Tiled(const float* values, int64_t c, int64_t tile) {
  std::vector<float> out(tile * c);
  for (int64_t k = 0; k < tile * c; ++k) out[k] = values[k % c];
  return out;
}

// Per channel, the mean of up to kShiftRows rows spread evenly over x [m, c] (a shift for the one-pass moments).
template <typename T>
std::vector<float> ShiftNearMean(const T* x, int64_t m, int64_t c) {
  const int64_t rows = std::min(m, kShiftRows);
  std::vector<double> sum(c, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const T* p = x + (i * m / rows) * c;
    for (int64_t j = 0; j < c; ++j) sum[j] += Load(p, j);
  }
  std::vector<float> shift(c);
  for (int64_t j = 0; j < c; ++j) shift[j] = static_cast<float>(sum[j] / rows);
  return shift;
}

template <typename T>
void ForwardTyped(ffi::ThreadPool& pool, int64_t threads, const T* x, const T* res, const float* scale,
                  const float* bias, T* y, float* mean, float* var, int64_t m, int64_t c, float epsilon, bool relu) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  const int64_t tile = TileRows(c);
  // One pass for both moments, about a per-channel shift near the mean (the mean of kShiftRows rows spread over x),
  // so that var = E[d^2] - E[d]^2 cancels few digits even where |mean| >> std.
  const std::vector<float> shift = ShiftNearMean(x, m, c);
  const std::vector<float> shift_t = Tiled(shift.data(), c, tile);
  std::vector<double> moments = ChannelSums(pool, threads, chunks, 2 * c, [&](int64_t i, double* acc) {
    MomentRows(x, c, tile, chunks.begin(i), chunks.end(i), shift_t.data(), acc, acc + c);
  });
  std::vector<double> var_d(c);
  for (int64_t j = 0; j < c; ++j) {
    const double d_mean = moments[j] / m;
    mean[j] = static_cast<float>(shift[j] + d_mean);
    var_d[j] = std::max(0.0, moments[c + j] / m - d_mean * d_mean);
  }
  const std::vector<float> mean_t = Tiled(mean, c, tile);
  std::vector<float> a(c);
  for (int64_t j = 0; j < c; ++j) {
    var[j] = static_cast<float>(var_d[j]);
    a[j] = (1.0f / std::sqrt(var[j] + epsilon)) * scale[j];
  }
  const std::vector<float> a_t = Tiled(a.data(), c, tile), b_t = Tiled(bias, c, tile);
  ForChunks(pool, threads, chunks, [&](int64_t i) {
    NormalizeRows(x, res, y, c, tile, chunks.begin(i), chunks.end(i), mean_t.data(), a_t.data(), b_t.data(),
                  relu);
  });
}

template <typename T>
void BackwardTyped(ffi::ThreadPool& pool, int64_t threads, const T* x, const T* res, const T* dy, const float* mean,
                   const float* var, const float* scale, const float* bias, T* dx, T* dres, float* dscale,
                   float* dbias, int64_t m, int64_t c, float epsilon, bool relu) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  const int64_t tile = TileRows(c);
  std::vector<float> rstd(c), a(c);
  for (int64_t j = 0; j < c; ++j) {
    rstd[j] = 1.0f / std::sqrt(var[j] + epsilon);
    a[j] = rstd[j] * scale[j];
  }
  const std::vector<float> mean_t = Tiled(mean, c, tile), rstd_t = Tiled(rstd.data(), c, tile);
  const std::vector<float> a_t = Tiled(a.data(), c, tile), b_t = Tiled(bias, c, tile);
  std::vector<double> sums = ChannelSums(pool, threads, chunks, 2 * c, [&](int64_t i, double* acc) {
    GradSumRows(x, res, dy, c, tile, chunks.begin(i), chunks.end(i), mean_t.data(), rstd_t.data(), a_t.data(),
                b_t.data(), relu, acc, acc + c);
  });
  std::vector<float> mean_dbias(c), mean_dscale(c);
  for (int64_t j = 0; j < c; ++j) {
    dbias[j] = static_cast<float>(sums[j]);
    dscale[j] = static_cast<float>(sums[c + j]);
    mean_dbias[j] = dbias[j] / m;
    mean_dscale[j] = dscale[j] / m;
  }
  const std::vector<float> mean_dbias_t = Tiled(mean_dbias.data(), c, tile);
  const std::vector<float> mean_dscale_t = Tiled(mean_dscale.data(), c, tile);
  ForChunks(pool, threads, chunks, [&](int64_t i) {
    GradRows(x, res, dy, dx, dres, c, tile, chunks.begin(i), chunks.end(i), mean_t.data(), rstd_t.data(),
             a_t.data(), b_t.data(), mean_dbias_t.data(), mean_dscale_t.data(), relu);
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

// The activation-shaped buffers of one call as typed pointers (null where a buffer is absent).
template <typename T>
const T* In(const ffi::AnyBuffer* b) { return b ? static_cast<const T*>(b->untyped_data()) : nullptr; }
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>* b) { return b ? static_cast<T*>((*b)->untyped_data()) : nullptr; }

ffi::Error ForwardImpl(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const ffi::AnyBuffer* res,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var, float epsilon, int64_t relu,
                       int64_t threads) {
  const ffi::DataType r_type = res ? res->element_type() : x.element_type();
  if (auto error = CheckTypes({x.element_type(), y->element_type(), r_type}); error.failure()) return error;
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("jaxcnn batch norm: x must be [..., C]");
  const int64_t m = Rows(dims), c = dims[dims.size() - 1];
  try {
    if (x.element_type() == ffi::DataType::BF16) {
      ForwardTyped(pool, threads, In<uint16_t>(&x), In<uint16_t>(res), scale.typed_data(), bias.typed_data(),
                   Out<uint16_t>(&y), mean->typed_data(), var->typed_data(), m, c, epsilon, relu != 0);
    } else {
      ForwardTyped(pool, threads, In<float>(&x), In<float>(res), scale.typed_data(), bias.typed_data(),
                   Out<float>(&y), mean->typed_data(), var->typed_data(), m, c, epsilon, relu != 0);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn batch norm failed: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const ffi::AnyBuffer* res,
                        const ffi::AnyBuffer& dy, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer>* dres, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, float epsilon, int64_t relu, int64_t threads) {
  const ffi::DataType r_type = res ? res->element_type() : x.element_type();
  const ffi::DataType dr_type = dres ? (*dres)->element_type() : x.element_type();
  if (auto error = CheckTypes({x.element_type(), dy.element_type(), dx->element_type(), r_type, dr_type});
      error.failure()) {
    return error;
  }
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("jaxcnn batch norm: x must be [..., C]");
  const int64_t m = Rows(dims), c = dims[dims.size() - 1];
  try {
    if (x.element_type() == ffi::DataType::BF16) {
      BackwardTyped(pool, threads, In<uint16_t>(&x), In<uint16_t>(res), In<uint16_t>(&dy), mean.typed_data(),
                    var.typed_data(), scale.typed_data(), bias.typed_data(), Out<uint16_t>(&dx), Out<uint16_t>(dres),
                    dscale->typed_data(), dbias->typed_data(), m, c, epsilon, relu != 0);
    } else {
      BackwardTyped(pool, threads, In<float>(&x), In<float>(res), In<float>(&dy), mean.typed_data(),
                    var.typed_data(), scale.typed_data(), bias.typed_data(), Out<float>(&dx), Out<float>(dres),
                    dscale->typed_data(), dbias->typed_data(), m, c, epsilon, relu != 0);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn batch norm backward failed: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                   float epsilon, int64_t relu, int64_t threads) {
  return ForwardImpl(pool, x, nullptr, scale, bias, y, mean, var, epsilon, relu, threads);
}

ffi::Error ForwardAdd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer res, ffi::Result<ffi::AnyBuffer> y,
                      ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var, float epsilon, int64_t relu,
                      int64_t threads) {
  return ForwardImpl(pool, x, &res, scale, bias, y, mean, var, epsilon, relu, threads);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, float epsilon, int64_t relu, int64_t threads) {
  return BackwardImpl(pool, x, nullptr, dy, mean, var, scale, bias, dx, nullptr, dscale, dbias, epsilon, relu,
                      threads);
}

ffi::Error BackwardAdd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                       ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::AnyBuffer res, ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                       ffi::ResultBuffer<ffi::F32> dbias, ffi::Result<ffi::AnyBuffer> dres, float epsilon,
                       int64_t relu, int64_t threads) {
  return BackwardImpl(pool, x, &res, dy, mean, var, scale, bias, dx, &dres, dscale, dbias, epsilon, relu, threads);
}

}  // namespace

#define JAXCNN_NORM_ATTRS .Attr<float>("epsilon").Attr<int64_t>("relu").Attr<int64_t>("threads")
#define JAXCNN_F32 ffi::Buffer<ffi::F32>

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<JAXCNN_F32>()      // scale
                                  .Arg<JAXCNN_F32>()      // bias
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<JAXCNN_F32>()      // mean
                                  .Ret<JAXCNN_F32>()      // var
                                      JAXCNN_NORM_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormAddFwd, ForwardAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<JAXCNN_F32>()      // scale
                                  .Arg<JAXCNN_F32>()      // bias
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<JAXCNN_F32>()      // mean
                                  .Ret<JAXCNN_F32>()      // var
                                      JAXCNN_NORM_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<JAXCNN_F32>()      // mean
                                  .Arg<JAXCNN_F32>()      // var
                                  .Arg<JAXCNN_F32>()      // scale
                                  .Arg<JAXCNN_F32>()      // bias
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<JAXCNN_F32>()      // dscale
                                  .Ret<JAXCNN_F32>()      // dbias
                                      JAXCNN_NORM_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormAddBwd, BackwardAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<JAXCNN_F32>()      // mean
                                  .Arg<JAXCNN_F32>()      // var
                                  .Arg<JAXCNN_F32>()      // scale
                                  .Arg<JAXCNN_F32>()      // bias
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<JAXCNN_F32>()      // dscale
                                  .Ret<JAXCNN_F32>()      // dbias
                                  .Ret<ffi::AnyBuffer>()  // dresidual
                                      JAXCNN_NORM_ATTRS);
