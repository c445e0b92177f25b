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
// and, float32 only, the same followed by a max pool over non-overlapping kh x kw windows (a VGG stage's last
// BatchNorm, ReLU and pool), whose full-size output is then never written:
//   JaxcnnNormPoolFwd (x [B, H, W, C], scale, bias) -> y [B, H / kh, W / kw, C], code s8 (same shape), mean, var
//   JaxcnnNormPoolBwd (x, g [B, H / kh, W / kw, C], code, mean, var, scale, bias) -> dx, dscale, dbias
// where y is the max pool of the BatchNorm (+ ReLU) output as max_pool.cc computes it (the same choice in each
// window, `code`: its row-major index there; rows and columns past the last whole window are dropped) and dx is
// BatchNorm's gradient for the cotangent that is g at each window's chosen element and 0 elsewhere (attributes
// "kh", "kw" besides the three below).
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
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bfloat16.h"
#include "bfloat16_avx512.h"
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
// A lambda inlined where it is called, so that it is compiled for the caller's instruction set (a target_clones
// clone, or an AVX-512 function) rather than as a separate function for the default one.
#define JAXCNN_INLINE_LAMBDA __attribute__((always_inline))

constexpr int64_t kBlockRows = 64;   // rows summed in float32 before a double add
constexpr int64_t kTileValues = 256;  // values per tile of whole rows (see MomentRowsT)
constexpr int64_t kShiftRows = 64;    // rows whose mean shifts the one-pass moments (see ShiftNearMean)

using jaxcnn::Narrow;
using jaxcnn::Widen;
#if defined(__x86_64__)
using jaxcnn::Avx512Bf16Rounding;
using jaxcnn::HasAvx512;
using jaxcnn::LoadBf16;
using jaxcnn::StoreBf16;
#endif

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

// body(r, n) for each tile of rows [r0, r1): its first row r and its n values (n / c rows, at most `tile`).
template <typename Body>
JAXCNN_INLINE void ForTiles(int64_t c, int64_t tile, int64_t r0, int64_t r1, const Body& body) {
  for (int64_t r = r0; r < r1; r += tile) body(r, std::min(tile, r1 - r) * c);
}

// body(r, n, b1, b2) for each tile of rows [r0, r1), adding to the tile positions' float32 sums b1 and b2, which
// are added to double every kBlockRows rows and folded to c channels into out1 and out2 at the end.
template <typename Body>
JAXCNN_INLINE void SumTiles(int64_t c, int64_t tile, int64_t r0, int64_t r1, double* out1, double* out2,
                            const Body& body) {
  const int64_t block_rows = tile * std::max<int64_t>(1, kBlockRows / tile);
  TwoSums sums(tile * c);
  for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
    sums.StartBlock();
    ForTiles(c, tile, b0, std::min(r1, b0 + block_rows),
             [&](int64_t r, int64_t n) JAXCNN_INLINE_LAMBDA { body(r, n, sums.b1.data(), sums.b2.data()); });
    sums.EndBlock();
  }
  sums.Fold(c, out1, out2);
}

// s1[c] += sum over rows [r0, r1) of d, s2[c] += sum of d^2, with d = x[r, c] - shift[c] (shift: tiled).
template <typename T>
JAXCNN_INLINE void MomentRowsT(const T* x, int64_t c, int64_t tile, int64_t r0, int64_t r1, const float* shift,
                               double* s1, double* s2) {
  SumTiles(c, tile, r0, r1, s1, s2, [&](int64_t r, int64_t n, float* b1, float* b2) JAXCNN_INLINE_LAMBDA {
    const T* p = x + r * c;
    #pragma GCC ivdep  // the arrays never overlap
    for (int64_t k = 0; k < n; ++k) {
      const float d = Load(p, k) - shift[k];
      b1[k] += d;
      b2[k] += d * d;
    }
  });
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
  ForTiles(c, tile, r0, r1, [&](int64_t r, int64_t n) JAXCNN_INLINE_LAMBDA {
    const T* xp = x + r * c;
    const T* rp = res ? res + r * c : nullptr;
    T* yp = y + r * c;
    #pragma GCC ivdep  // the arrays never overlap
    for (int64_t k = 0; k < n; ++k) {
      float v = PreActivation<kResidual>(xp, rp, k, mean, a, b);
      if constexpr (kRelu) v = v > 0.0f ? v : 0.0f;
      Store(yp, k, v);
    }
  });
}

// dbias and dscale partial sums over rows [r0, r1): sum(dy'), sum(dy' * xhat), dy' = dy masked by the ReLU.
template <bool kResidual, bool kRelu, typename T>
JAXCNN_INLINE void GradSumRowsT(const T* x, const T* res, const T* dy, int64_t c, int64_t tile, int64_t r0,
                                int64_t r1, const float* mean, const float* rstd, const float* a, const float* b,
                                double* dbias, double* dscale) {
  SumTiles(c, tile, r0, r1, dbias, dscale, [&](int64_t r, int64_t n, float* sb, float* ss) JAXCNN_INLINE_LAMBDA {
    const T* xp = x + r * c;
    const T* rp = res ? res + r * c : nullptr;
    const T* gp = dy + r * c;
    #pragma GCC ivdep  // the arrays never overlap
    for (int64_t k = 0; k < n; ++k) {
      const float xv = Load(xp, k);
      float g = Load(gp, k);
      if constexpr (kRelu) g = PreActivation<kResidual>(xp, rp, k, mean, a, b) > 0.0f ? g : 0.0f;
      sb[k] += g;
      ss[k] += g * ((xv - mean[k]) * rstd[k]);
    }
  });
}

// dx of the rows [r0, r1), and dres (the residual's gradient: dy where the ReLU passed it) when dres is given.
template <bool kResidual, bool kRelu, typename T>
JAXCNN_INLINE void GradRowsT(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t c, int64_t tile,
                             int64_t r0, int64_t r1, const float* mean, const float* rstd, const float* a,
                             const float* b, const float* mean_dbias, const float* mean_dscale) {
  ForTiles(c, tile, r0, r1, [&](int64_t r, int64_t n) JAXCNN_INLINE_LAMBDA {
    const T* xp = x + r * c;
    const T* rp = res ? res + r * c : nullptr;
    const T* gp = dy + r * c;
    T* out = dx + r * c;
    T* dres_p = dres ? dres + r * c : nullptr;
    #pragma GCC ivdep  // the arrays never overlap
    for (int64_t k = 0; k < n; ++k) {
      const float xv = Load(xp, k);
      float g = Load(gp, k);
      if constexpr (kRelu) g = PreActivation<kResidual>(xp, rp, k, mean, a, b) > 0.0f ? g : 0.0f;
      const float xhat = (xv - mean[k]) * rstd[k];
      Store(out, k, a[k] * (g - mean_dbias[k] - xhat * mean_dscale[k]));
      if constexpr (kResidual) Store(dres_p, k, g);
    }
  });
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

// The same with a third template argument after the two.
#define JAXCNN_SPECIALISE3(KERNEL, THIRD, ...)      \
  if (res && relu) {                                \
    KERNEL<true, true, THIRD>(__VA_ARGS__);         \
  } else if (res) {                                 \
    KERNEL<true, false, THIRD>(__VA_ARGS__);        \
  } else if (relu) {                                \
    KERNEL<false, true, THIRD>(__VA_ARGS__);        \
  } else {                                          \
    KERNEL<false, false, THIRD>(__VA_ARGS__);       \
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

// The loops in AVX-512 for C a multiple of 16 (so every row is whole vectors), 16 values at a time: the two summing
// loops for float32 and bfloat16, the normalising and input-gradient loops for bfloat16 (GCC vectorises the portable
// float32 ones, and leaves the portable bfloat16 ones mostly scalar). bfloat16 conversions are vector operations
// (Widen's exactly; Narrow's bit for bit, see StoreBf16). The same expressions forward and backward (AffineV, the
// ReLU's mask), so the backward pass recomputes the forward's mask. The summing loops keep their sums in registers
// (SumRowsV): sums per tile position in memory, as the portable loops keep them, cost a store and a reload per
// vector, 2.6x the time of the bfloat16 moments pass and 1.9x that of its gradient sums (32x32x16 layer, 64 images,
// one thread: 0.186 vs 0.072 ms and 0.270 vs 0.141 ms; float32 0.21 vs 0.137 ms and 0.338 vs 0.283 ms; 2026-12-07,
// the 2-core Xeon of benchmarks/README.md).
#if defined(__x86_64__)
JAXCNN_AVX512 inline __m512 AffineV(__m512 x, __m512 mean, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(_mm512_sub_ps(x, mean), a, b);
}

// max(v, 0) returns 0 for NaN, as `v > 0 ? v : 0` does.
JAXCNN_AVX512 inline __m512 ReluV(__m512 v) { return _mm512_max_ps(v, _mm512_setzero_ps()); }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")  // the lambdas below too (called once per tile)

// 16 activations as floats.
JAXCNN_AVX512 inline __m512 LoadV(const float* p) { return _mm512_loadu_ps(p); }
JAXCNN_AVX512 inline __m512 LoadV(const uint16_t* p) { return LoadBf16(p); }

// PreActivation on the 16 values at offset k of x and r (the per-channel arrays at the same offset).
template <bool kResidual, typename T>
JAXCNN_AVX512 inline __m512 PreActivationV(const T* xp, const T* rp, int64_t k, const float* mean,
                                           const float* a, const float* b) {
  const __m512 v = AffineV(LoadV(xp + k), _mm512_loadu_ps(mean + k), _mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k));
  if constexpr (kResidual) return _mm512_add_ps(v, LoadV(rp + k));
  return v;
}

// The ReLU's mask of 16 values: where the forward's value before it was > 0 (all lanes without a ReLU).
template <bool kResidual, bool kRelu, typename T>
JAXCNN_AVX512 inline __mmask16 PassedV(const T* xp, const T* rp, int64_t k, const float* mean,
                                       const float* a, const float* b) {
  if constexpr (!kRelu) return 0xffff;
  return _mm512_cmp_ps_mask(PreActivationV<kResidual>(xp, rp, k, mean, a, b), _mm512_setzero_ps(), _CMP_GT_OQ);
}

// xhat = (x - mean) * rstd on 16 values.
template <typename T>
JAXCNN_AVX512 inline __m512 XhatV(const T* xp, int64_t k, const float* mean, const float* rstd) {
  return _mm512_mul_ps(_mm512_sub_ps(LoadV(xp + k), _mm512_loadu_ps(mean + k)), _mm512_loadu_ps(rstd + k));
}

// Two per-channel sums over rows [r0, r1) of a [., c] layout, in registers: body(row, k, s1, s2) adds the 16 values
// at channel offset k of `row` to the accumulators s1 and s2. The channels go in groups of G vectors (G = 8, 4, 2,
// 1, as many as fit), each group's rows 8 / G at a time, so that 8 accumulators of each sum run side by side; each
// accumulator sums a block of kBlockRows rows in float32, added to the double sums out1[c] and out2[c] at the
// block's end.
// out[0..16) += the sum, in double, of the R float32 accumulators s[0], s[G], ..., s[(R - 1) * G].
template <int R, int G>
JAXCNN_INLINE void AddRowsToDouble(const __m512* s, double* out) {
  __m512d lo = _mm512_setzero_pd(), hi = lo;
  for (int i = 0; i < R; ++i) {
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(s[i * G])));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s[i * G]), 1))));
  }
  _mm512_storeu_pd(out, _mm512_add_pd(_mm512_loadu_pd(out), lo));
  _mm512_storeu_pd(out + 8, _mm512_add_pd(_mm512_loadu_pd(out + 8), hi));
}

template <int G, typename Body>
JAXCNN_INLINE void SumBlockV(int64_t k0, int64_t b0, int64_t b1, double* out1, double* out2, const Body& body) {
  constexpr int R = 8 / G;
  __m512 s1[8], s2[8];
  for (int i = 0; i < 8; ++i) s1[i] = s2[i] = _mm512_setzero_ps();
  int64_t r = b0;
  for (; r + R <= b1; r += R) {
    for (int i = 0; i < R; ++i) {
      for (int g = 0; g < G; ++g) body(r + i, k0 + 16 * g, s1[i * G + g], s2[i * G + g]);
    }
  }
  for (; r < b1; ++r) {
    for (int g = 0; g < G; ++g) body(r, k0 + 16 * g, s1[g], s2[g]);
  }
  for (int g = 0; g < G; ++g) {
    AddRowsToDouble<R, G>(s1 + g, out1 + k0 + 16 * g);
    AddRowsToDouble<R, G>(s2 + g, out2 + k0 + 16 * g);
  }
}

template <typename Body>
JAXCNN_INLINE void SumRowsV(int64_t c, int64_t r0, int64_t r1, double* out1, double* out2, const Body& body) {
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    const int64_t b1 = std::min(r1, b0 + kBlockRows);
    int64_t k = 0;
    for (; k + 128 <= c; k += 128) SumBlockV<8>(k, b0, b1, out1, out2, body);
    if (k + 64 <= c) { SumBlockV<4>(k, b0, b1, out1, out2, body); k += 64; }
    if (k + 32 <= c) { SumBlockV<2>(k, b0, b1, out1, out2, body); k += 32; }
    if (k + 16 <= c) { SumBlockV<1>(k, b0, b1, out1, out2, body); k += 16; }
  }
}

template <typename T>
JAXCNN_AVX512 void MomentRowsV(const T* x, int64_t c, int64_t r0, int64_t r1, const float* shift,
                                   double* s1, double* s2) {
  SumRowsV(c, r0, r1, s1, s2, [&](int64_t r, int64_t k, __m512& a1, __m512& a2) JAXCNN_INLINE_LAMBDA {
    const __m512 d = _mm512_sub_ps(LoadV(x + r * c + k), _mm512_loadu_ps(shift + k));
    a1 = _mm512_add_ps(a1, d);
    a2 = _mm512_fmadd_ps(d, d, a2);
  });
}

template <bool kResidual, bool kRelu, bool kCvt>
JAXCNN_AVX512 void NormalizeRowsBf16V(const uint16_t* x, const uint16_t* res, uint16_t* y, int64_t c, int64_t tile,
                                      int64_t r0, int64_t r1, const float* mean, const float* a, const float* b) {
  ForTiles(c, tile, r0, r1, [&](int64_t r, int64_t n) {
    const uint16_t* xp = x + r * c;
    const uint16_t* rp = res ? res + r * c : nullptr;
    uint16_t* yp = y + r * c;
    for (int64_t k = 0; k < n; k += 16) {
      __m512 v = PreActivationV<kResidual>(xp, rp, k, mean, a, b);
      if constexpr (kRelu) v = ReluV(v);
      StoreBf16<kCvt>(yp + k, v);
    }
  });
}

template <bool kResidual, bool kRelu, typename T>
JAXCNN_AVX512 void GradSumRowsV(const T* x, const T* res, const T* dy, int64_t c,
                                    int64_t r0, int64_t r1, const float* mean, const float* rstd, const float* a,
                                    const float* b, double* dbias, double* dscale) {
  SumRowsV(c, r0, r1, dbias, dscale, [&](int64_t r, int64_t k, __m512& sb, __m512& ss) JAXCNN_INLINE_LAMBDA {
    const T* xp = x + r * c;
    const T* rp = res ? res + r * c : nullptr;
    const __m512 g = _mm512_maskz_mov_ps(PassedV<kResidual, kRelu>(xp, rp, k, mean, a, b), LoadV(dy + r * c + k));
    sb = _mm512_add_ps(sb, g);
    ss = _mm512_fmadd_ps(g, XhatV(xp, k, mean, rstd), ss);
  });
}

template <bool kResidual, bool kRelu, bool kCvt>
JAXCNN_AVX512 void GradRowsBf16V(const uint16_t* x, const uint16_t* res, const uint16_t* dy, uint16_t* dx,
                                 uint16_t* dres, int64_t c, int64_t tile, int64_t r0, int64_t r1, const float* mean,
                                 const float* rstd, const float* a, const float* b, const float* mean_dbias,
                                 const float* mean_dscale) {
  ForTiles(c, tile, r0, r1, [&](int64_t r, int64_t n) {
    const uint16_t* xp = x + r * c;
    const uint16_t* rp = res ? res + r * c : nullptr;
    const uint16_t* gp = dy + r * c;
    uint16_t* out = dx + r * c;
    uint16_t* dres_p = dres ? dres + r * c : nullptr;
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 passed = PassedV<kResidual, kRelu>(xp, rp, k, mean, a, b);
      const __m256i g_bits = _mm256_maskz_mov_epi16(passed, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + k)));
      const __m512 g = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(g_bits), 16));
      const __m512 xhat = XhatV(xp, k, mean, rstd);
      const __m512 centred = _mm512_sub_ps(g, _mm512_loadu_ps(mean_dbias + k));
      StoreBf16<kCvt>(out + k, _mm512_mul_ps(_mm512_loadu_ps(a + k),
                                             _mm512_fnmadd_ps(xhat, _mm512_loadu_ps(mean_dscale + k), centred)));
      if constexpr (kResidual) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dres_p + k), g_bits);
    }
  });
}

#pragma GCC pop_options

// Whether the loops run as the AVX-512 ones above (the two summing loops for float32 and bfloat16, the other two
// for bfloat16).
bool Vectors(int64_t c) { return c % 16 == 0 && HasAvx512(); }
#else
bool Vectors(int64_t) { return false; }
#endif

// The four loops for either activation type: with C a multiple of 16 on AVX-512 as the vector loops above (the
// summing ones for both types, the others for bfloat16: GCC vectorises the portable float32 ones), everything else
// as the portable loops.
template <typename T>
void MomentRowsAny(const T* x, int64_t c, int64_t tile, int64_t r0, int64_t r1, const float* shift, double* s1,
                   double* s2) {
#if defined(__x86_64__)
  if (Vectors(c)) return MomentRowsV(x, c, r0, r1, shift, s1, s2);
#endif
  MomentRows(x, c, tile, r0, r1, shift, s1, s2);
}

template <typename T>
void NormalizeRowsAny(const T* x, const T* res, T* y, int64_t c, int64_t tile, int64_t r0, int64_t r1,
                      const float* mean, const float* a, const float* b, bool relu) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (Vectors(c)) {
      if (Avx512Bf16Rounding()) {
        JAXCNN_SPECIALISE3(NormalizeRowsBf16V, true, x, res, y, c, tile, r0, r1, mean, a, b);
      } else {
        JAXCNN_SPECIALISE3(NormalizeRowsBf16V, false, x, res, y, c, tile, r0, r1, mean, a, b);
      }
      return;
    }
  }
#endif
  NormalizeRows(x, res, y, c, tile, r0, r1, mean, a, b, relu);
}

template <typename T>
void GradSumRowsAny(const T* x, const T* res, const T* dy, int64_t c, int64_t tile, int64_t r0, int64_t r1,
                    const float* mean, const float* rstd, const float* a, const float* b, bool relu, double* dbias,
                    double* dscale) {
#if defined(__x86_64__)
  if (Vectors(c)) {
    JAXCNN_SPECIALISE(GradSumRowsV, x, res, dy, c, r0, r1, mean, rstd, a, b, dbias, dscale);
    return;
  }
#endif
  GradSumRows(x, res, dy, c, tile, r0, r1, mean, rstd, a, b, relu, dbias, dscale);
}

template <typename T>
void GradRowsAny(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t c, int64_t tile, int64_t r0,
                 int64_t r1, const float* mean, const float* rstd, const float* a, const float* b,
                 const float* mean_dbias, const float* mean_dscale, bool relu) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (Vectors(c)) {
      if (Avx512Bf16Rounding()) {
        JAXCNN_SPECIALISE3(GradRowsBf16V, true, x, res, dy, dx, dres, c, tile, r0, r1, mean, rstd, a, b,
                           mean_dbias, mean_dscale);
      } else {
        JAXCNN_SPECIALISE3(GradRowsBf16V, false, x, res, dy, dx, dres, c, tile, r0, r1, mean, rstd, a, b,
                           mean_dbias, mean_dscale);
      }
      return;
    }
  }
#endif
  GradRows(x, res, dy, dx, dres, c, tile, r0, r1, mean, rstd, a, b, mean_dbias, mean_dscale, relu);
}

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

// The batch statistics of x [m, c] into mean and var (biased), and a = rstd * scale per channel.
template <typename T>
void Statistics(ffi::ThreadPool& pool, int64_t threads, const T* x, const float* scale, float* mean, float* var,
                float* a, int64_t m, int64_t c, float epsilon) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  const int64_t tile = TileRows(c);
  // One pass for both moments, about a per-channel shift near the mean (the mean of kShiftRows rows spread over x),
  // so that var = E[d^2] - E[d]^2 cancels few digits even where |mean| >> std.
  const std::vector<float> shift = ShiftNearMean(x, m, c);
  const std::vector<float> shift_t = Tiled(shift.data(), c, tile);
  std::vector<double> moments = ChannelSums(pool, threads, chunks, 2 * c, [&](int64_t i, double* acc) {
    MomentRowsAny(x, c, tile, chunks.begin(i), chunks.end(i), shift_t.data(), acc, acc + c);
  });
  for (int64_t j = 0; j < c; ++j) {
    const double d_mean = moments[j] / m;
    mean[j] = static_cast<float>(shift[j] + d_mean);
    var[j] = static_cast<float>(std::max(0.0, moments[c + j] / m - d_mean * d_mean));
    a[j] = (1.0f / std::sqrt(var[j] + epsilon)) * scale[j];
  }
}

template <typename T>
void ForwardTyped(ffi::ThreadPool& pool, int64_t threads, const T* x, const T* res, const float* scale,
                  const float* bias, T* y, float* mean, float* var, int64_t m, int64_t c, float epsilon, bool relu) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  const int64_t tile = TileRows(c);
  std::vector<float> a(c);
  Statistics(pool, threads, x, scale, mean, var, a.data(), m, c, epsilon);
  const std::vector<float> mean_t = Tiled(mean, c, tile);
  const std::vector<float> a_t = Tiled(a.data(), c, tile), b_t = Tiled(bias, c, tile);
  ForChunks(pool, threads, chunks, [&](int64_t i) {
    NormalizeRowsAny(x, res, y, c, tile, chunks.begin(i), chunks.end(i), mean_t.data(), a_t.data(), b_t.data(),
                     relu);
  });
}

// The backward pass's per-channel factors from the forward's statistics: rstd = 1 / sqrt(var + epsilon) and
// a = rstd * scale.
struct BackwardFactors {
  std::vector<float> rstd, a;
  BackwardFactors(const float* var, const float* scale, int64_t c, float epsilon) : rstd(c), a(c) {
    for (int64_t j = 0; j < c; ++j) {
      rstd[j] = 1.0f / std::sqrt(var[j] + epsilon);
      a[j] = rstd[j] * scale[j];
    }
  }
};

// dbias and dscale from the double sums [dbias..., dscale...] of c channels, and their means over m values.
void FinishGradSums(const std::vector<double>& sums, int64_t m, int64_t c, float* dbias, float* dscale,
                    std::vector<float>& mean_dbias, std::vector<float>& mean_dscale) {
  mean_dbias.resize(c);
  mean_dscale.resize(c);
  for (int64_t j = 0; j < c; ++j) {
    dbias[j] = static_cast<float>(sums[j]);
    dscale[j] = static_cast<float>(sums[c + j]);
    mean_dbias[j] = dbias[j] / m;
    mean_dscale[j] = dscale[j] / m;
  }
}

template <typename T>
void BackwardTyped(ffi::ThreadPool& pool, int64_t threads, const T* x, const T* res, const T* dy, const float* mean,
                   const float* var, const float* scale, const float* bias, T* dx, T* dres, float* dscale,
                   float* dbias, int64_t m, int64_t c, float epsilon, bool relu) {
  const Chunks chunks(m, std::max<int64_t>(1, pool.num_threads()));
  const int64_t tile = TileRows(c);
  const BackwardFactors f(var, scale, c, epsilon);
  const std::vector<float> mean_t = Tiled(mean, c, tile), rstd_t = Tiled(f.rstd.data(), c, tile);
  const std::vector<float> a_t = Tiled(f.a.data(), c, tile), b_t = Tiled(bias, c, tile);
  std::vector<double> sums = ChannelSums(pool, threads, chunks, 2 * c, [&](int64_t i, double* acc) {
    GradSumRowsAny(x, res, dy, c, tile, chunks.begin(i), chunks.end(i), mean_t.data(), rstd_t.data(), a_t.data(),
                   b_t.data(), relu, acc, acc + c);
  });
  std::vector<float> mean_dbias, mean_dscale;
  FinishGradSums(sums, m, c, dbias, dscale, mean_dbias, mean_dscale);
  const std::vector<float> mean_dbias_t = Tiled(mean_dbias.data(), c, tile);
  const std::vector<float> mean_dscale_t = Tiled(mean_dscale.data(), c, tile);
  ForChunks(pool, threads, chunks, [&](int64_t i) {
    GradRowsAny(x, res, dy, dx, dres, c, tile, chunks.begin(i), chunks.end(i), mean_t.data(), rstd_t.data(),
                a_t.data(), b_t.data(), mean_dbias_t.data(), mean_dscale_t.data(), relu);
  });
}

// ---- BatchNorm (+ ReLU) then a max pool over non-overlapping kh x kw windows, float32 --------------------------
//
// The loops run over one window position (or one x position) at a time, with the channels as the vector axis, in
// blocks of kChannelBlock channels.

constexpr int64_t kChannelBlock = 64;

struct PoolDims {
  int64_t b, h, w, c, kh, kw, ho, wo;
};

// y (and code) of the output rows [r0, r1), r = image * ho + output row: each window scanned in row-major order,
// the choice moving to a later element whenever the current one is not >= it (max_pool.cc's rule), y the
// NaN-propagating maximum, of the values BatchNorm (+ ReLU) gives (Affine, as NormalizeRowsT computes them).
template <bool kRelu>
JAXCNN_INLINE void NormPoolRowsT(const PoolDims& s, const float* x, float* y, int8_t* code, const float* mean,
                                 const float* a, const float* b, int64_t r0, int64_t r1) {
  float best[kChannelBlock], out[kChannelBlock];
  int32_t chosen[kChannelBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t image = r / s.ho, oi = r % s.ho;
    const float* rows = x + (image * s.h + oi * s.kh) * s.w * s.c;
    for (int64_t oj = 0; oj < s.wo; ++oj) {
      for (int64_t c0 = 0; c0 < s.c; c0 += kChannelBlock) {
        const int64_t n = std::min(kChannelBlock, s.c - c0);
        const float* mp = mean + c0;
        const float* ap = a + c0;
        const float* bp = b + c0;
        for (int64_t wa = 0; wa < s.kh; ++wa) {
          for (int64_t wb = 0; wb < s.kw; ++wb) {
            const int32_t k = static_cast<int32_t>(wa * s.kw + wb);
            const float* p = rows + (wa * s.w + oj * s.kw + wb) * s.c + c0;
            #pragma GCC ivdep
            for (int64_t j = 0; j < n; ++j) {
              float v = Affine(p[j], mp[j], ap[j], bp[j]);
              if constexpr (kRelu) v = v > 0.0f ? v : 0.0f;
              if (k == 0) {
                best[j] = out[j] = v;
                chosen[j] = 0;
              } else {
                const bool move = !(best[j] >= v);
                best[j] = move ? v : best[j];
                chosen[j] = move ? k : chosen[j];
                // After the ReLU no value is NaN and the maximum is the choice.
                if constexpr (!kRelu) {
                  out[j] = (std::isnan(out[j]) || std::isnan(v)) ? out[j] + v : (out[j] < v ? v : out[j]);
                }
              }
            }
          }
        }
        float* yp = y + (r * s.wo + oj) * s.c + c0;
        int8_t* cp = code + (r * s.wo + oj) * s.c + c0;
        for (int64_t j = 0; j < n; ++j) {
          yp[j] = kRelu ? best[j] : out[j];
          cp[j] = static_cast<int8_t>(chosen[j]);
        }
      }
    }
  }
}

// The cotangent BatchNorm's output gets along x row (image, i) with i < ho * kh, into g [w * c]: each window's g
// at its chosen element, 0 at the others and past the last whole window; then the ReLU's mask.
// `codes` [wo * c] is scratch space: the row's choices as floats, so that the loops below are float-only (a loop
// mixing int8 and float over 16 channels vectorises by 64 bytes and never enters its vector body).
template <bool kRelu>
JAXCNN_INLINE void ScatterRow(const PoolDims& s, const float* xrow, const float* grow, const int8_t* crow, int64_t wa,
                              const float* mean, const float* a, const float* b, float* codes, float* g) {
  for (int64_t t = 0; t < s.wo * s.c; ++t) codes[t] = static_cast<float>(crow[t]);
  for (int64_t oj = 0; oj < s.wo; ++oj) {
    const float* gp = grow + oj * s.c;
    const float* cp = codes + oj * s.c;
    for (int64_t wb = 0; wb < s.kw; ++wb) {
      const float k = static_cast<float>(wa * s.kw + wb);
      const int64_t at = (oj * s.kw + wb) * s.c;
      const float* xp = xrow + at;
      float* out = g + at;
      #pragma GCC ivdep
      for (int64_t j = 0; j < s.c; ++j) {
        float v = cp[j] == k ? gp[j] : 0.0f;
        if constexpr (kRelu) v = Affine(xp[j], mean[j], a[j], b[j]) > 0.0f ? v : 0.0f;
        out[j] = v;
      }
    }
  }
  std::fill(g + s.wo * s.kw * s.c, g + s.w * s.c, 0.0f);
}

// dbias and dscale partial sums over the x rows [r0, r1) (row = image * h + i): float32 over each row, double
// over the rows.
template <bool kRelu>
JAXCNN_INLINE void NormPoolGradSumsT(const PoolDims& s, const float* x, const float* gy, const int8_t* code,
                                     const float* mean, const float* rstd, const float* a, const float* b, int64_t r0,
                                     int64_t r1, double* dbias, double* dscale) {
  std::vector<float> g(s.w * s.c), codes(s.wo * s.c), sb(s.c), ss(s.c);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t image = r / s.h, i = r % s.h;
    if (i >= s.ho * s.kh) continue;  // no window reaches this row: its cotangent is 0
    const int64_t orow = image * s.ho + i / s.kh;
    const float* xrow = x + r * s.w * s.c;
    ScatterRow<kRelu>(s, xrow, gy + orow * s.wo * s.c, code + orow * s.wo * s.c, i % s.kh, mean, a, b,
                      codes.data(), g.data());
    std::fill(sb.begin(), sb.end(), 0.0f);
    std::fill(ss.begin(), ss.end(), 0.0f);
    float* sbp = sb.data();
    float* ssp = ss.data();
    for (int64_t jw = 0; jw < s.wo * s.kw; ++jw) {
      const float* xp = xrow + jw * s.c;
      const float* gp = g.data() + jw * s.c;
      #pragma GCC ivdep
      for (int64_t j = 0; j < s.c; ++j) {
        sbp[j] += gp[j];
        ssp[j] += gp[j] * ((xp[j] - mean[j]) * rstd[j]);
      }
    }
    for (int64_t j = 0; j < s.c; ++j) {
      dbias[j] += sb[j];
      dscale[j] += ss[j];
    }
  }
}

// dx of the x rows [r0, r1): BatchNorm's gradient (GradRowsT's expression) for the scattered cotangent.
template <bool kRelu>
JAXCNN_INLINE void NormPoolGradRowsT(const PoolDims& s, const float* x, const float* gy, const int8_t* code, float* dx,
                                     const float* mean, const float* rstd, const float* a, const float* b,
                                     const float* mean_dbias, const float* mean_dscale, int64_t r0, int64_t r1) {
  std::vector<float> g(s.w * s.c, 0.0f), codes(s.wo * s.c);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t image = r / s.h, i = r % s.h;
    const float* xrow = x + r * s.w * s.c;
    if (i < s.ho * s.kh) {
      const int64_t orow = image * s.ho + i / s.kh;
      ScatterRow<kRelu>(s, xrow, gy + orow * s.wo * s.c, code + orow * s.wo * s.c, i % s.kh, mean, a, b,
                        codes.data(), g.data());
    } else {
      std::fill(g.begin(), g.end(), 0.0f);
    }
    float* out = dx + r * s.w * s.c;
    for (int64_t jw = 0; jw < s.w; ++jw) {
      const float* xp = xrow + jw * s.c;
      const float* gp = g.data() + jw * s.c;
      float* op = out + jw * s.c;
      #pragma GCC ivdep
      for (int64_t j = 0; j < s.c; ++j) {
        const float xhat = (xp[j] - mean[j]) * rstd[j];
        op[j] = a[j] * (gp[j] - mean_dbias[j] - xhat * mean_dscale[j]);
      }
    }
  }
}

JAXCNN_CLONES void NormPoolRows(const PoolDims& s, const float* x, float* y, int8_t* code, const float* mean,
                                const float* a, const float* b, bool relu, int64_t r0, int64_t r1) {
  if (relu) NormPoolRowsT<true>(s, x, y, code, mean, a, b, r0, r1);
  else NormPoolRowsT<false>(s, x, y, code, mean, a, b, r0, r1);
}

JAXCNN_CLONES void NormPoolGradSums(const PoolDims& s, const float* x, const float* gy, const int8_t* code,
                                    const float* mean, const float* rstd, const float* a, const float* b, bool relu,
                                    int64_t r0, int64_t r1, double* dbias, double* dscale) {
  if (relu) NormPoolGradSumsT<true>(s, x, gy, code, mean, rstd, a, b, r0, r1, dbias, dscale);
  else NormPoolGradSumsT<false>(s, x, gy, code, mean, rstd, a, b, r0, r1, dbias, dscale);
}

JAXCNN_CLONES void NormPoolGradRows(const PoolDims& s, const float* x, const float* gy, const int8_t* code,
                                    float* dx, const float* mean, const float* rstd, const float* a, const float* b,
                                    const float* mean_dbias, const float* mean_dscale, bool relu, int64_t r0,
                                    int64_t r1) {
  if (relu) NormPoolGradRowsT<true>(s, x, gy, code, dx, mean, rstd, a, b, mean_dbias, mean_dscale, r0, r1);
  else NormPoolGradRowsT<false>(s, x, gy, code, dx, mean, rstd, a, b, mean_dbias, mean_dscale, r0, r1);
}

// The same three loops in AVX-512 for C a multiple of 16 (every VGG width): one vector per 16 channels of a window
// position, the window scan as max_pool.cc's (the same choice and, after the ReLU, where no value is NaN, the same
// maximum). The portable loops above run elsewhere; both give the same forward bits.
#if defined(__x86_64__)

template <bool kRelu>
JAXCNN_AVX512 void NormPoolRowsAvx512(const PoolDims& s, const float* x, float* y, int8_t* code, const float* mean,
                                      const float* a, const float* b, int64_t r0, int64_t r1) {
  const int64_t c = s.c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t image = r / s.ho, oi = r % s.ho;
    const float* rows = x + (image * s.h + oi * s.kh) * s.w * c;
    for (int64_t oj = 0; oj < s.wo; ++oj) {
      for (int64_t c0 = 0; c0 < c; c0 += 16) {
        const __m512 m = _mm512_loadu_ps(mean + c0), av = _mm512_loadu_ps(a + c0), bv = _mm512_loadu_ps(b + c0);
        const float* base = rows + oj * s.kw * c + c0;
        __m512 v = AffineV(_mm512_loadu_ps(base), m, av, bv);
        if constexpr (kRelu) v = ReluV(v);
        __m512 best = v, out = v;
        __m512i chosen = _mm512_setzero_si512();
        for (int64_t wa = 0; wa < s.kh; ++wa) {
          for (int64_t wb = wa == 0 ? 1 : 0; wb < s.kw; ++wb) {
            v = AffineV(_mm512_loadu_ps(base + (wa * s.w + wb) * c), m, av, bv);
            if constexpr (kRelu) v = ReluV(v);
            const __mmask16 move = static_cast<__mmask16>(~_mm512_cmp_ps_mask(best, v, _CMP_GE_OQ));
            best = _mm512_mask_mov_ps(best, move, v);
            chosen = _mm512_mask_mov_epi32(chosen, move, _mm512_set1_epi32(static_cast<int>(wa * s.kw + wb)));
            if constexpr (!kRelu) {
              const __mmask16 nan = _mm512_cmp_ps_mask(out, v, _CMP_UNORD_Q);
              out = _mm512_mask_mov_ps(_mm512_max_ps(out, v), nan, _mm512_add_ps(out, v));
            }
          }
        }
        const int64_t at = (r * s.wo + oj) * c + c0;
        _mm512_storeu_ps(y + at, kRelu ? best : out);
        _mm512_mask_cvtepi32_storeu_epi8(code + at, 0xFFFF, chosen);
      }
    }
  }
}

// The scattered, ReLU-masked cotangent at x position xp (channels c0..c0+15) of window element k, from the
// window's g and choice (gp, cp).
template <bool kRelu>
JAXCNN_AVX512 inline __m512 ScatteredV(const float* xp, const float* gp, const int8_t* cp, int k, __m512 m,
                                      __m512 av, __m512 bv) {
  const __m512i codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp)));
  __mmask16 take = _mm512_cmpeq_epi32_mask(codes, _mm512_set1_epi32(k));
  if constexpr (kRelu) {
    take &= _mm512_cmp_ps_mask(AffineV(_mm512_loadu_ps(xp), m, av, bv), _mm512_setzero_ps(), _CMP_GT_OQ);
  }
  return _mm512_maskz_loadu_ps(take, gp);
}

template <bool kRelu>
JAXCNN_AVX512 void NormPoolGradSumsAvx512(const PoolDims& s, const float* x, const float* gy, const int8_t* code,
                                          const float* mean, const float* rstd, const float* a, const float* b,
                                          int64_t r0, int64_t r1, double* dbias, double* dscale) {
  const int64_t c = s.c;
  std::vector<float> sb(c), ss(c);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t image = r / s.h, i = r % s.h;
    if (i >= s.ho * s.kh) continue;  // no window reaches this row: its cotangent is 0
    const int64_t orow = image * s.ho + i / s.kh, wa = i % s.kh;
    const float* xrow = x + r * s.w * c;
    for (int64_t c0 = 0; c0 < c; c0 += 16) {
      const __m512 m = _mm512_loadu_ps(mean + c0), av = _mm512_loadu_ps(a + c0), bv = _mm512_loadu_ps(b + c0);
      const __m512 rs = _mm512_loadu_ps(rstd + c0);
      __m512 acc_b = _mm512_setzero_ps(), acc_s = _mm512_setzero_ps();
      for (int64_t oj = 0; oj < s.wo; ++oj) {
        const int64_t o = (orow * s.wo + oj) * c + c0;
        for (int64_t wb = 0; wb < s.kw; ++wb) {
          const float* xp = xrow + (oj * s.kw + wb) * c + c0;
          const __m512 g = ScatteredV<kRelu>(xp, gy + o, code + o, static_cast<int>(wa * s.kw + wb), m, av, bv);
          const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xp), m), rs);
          acc_b = _mm512_add_ps(acc_b, g);
          acc_s = _mm512_fmadd_ps(g, xhat, acc_s);
        }
      }
      _mm512_storeu_ps(sb.data() + c0, acc_b);
      _mm512_storeu_ps(ss.data() + c0, acc_s);
    }
    for (int64_t j = 0; j < c; ++j) {
      dbias[j] += sb[j];
      dscale[j] += ss[j];
    }
  }
}

template <bool kRelu>
JAXCNN_AVX512 void NormPoolGradRowsAvx512(const PoolDims& s, const float* x, const float* gy, const int8_t* code,
                                          float* dx, const float* mean, const float* rstd, const float* a,
                                          const float* b, const float* mean_dbias, const float* mean_dscale,
                                          int64_t r0, int64_t r1) {
  const int64_t c = s.c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t image = r / s.h, i = r % s.h;
    const bool reached = i < s.ho * s.kh;
    const int64_t orow = image * s.ho + i / s.kh, wa = i % s.kh;
    const float* xrow = x + r * s.w * c;
    float* drow = dx + r * s.w * c;
    for (int64_t c0 = 0; c0 < c; c0 += 16) {
      const __m512 m = _mm512_loadu_ps(mean + c0), av = _mm512_loadu_ps(a + c0), bv = _mm512_loadu_ps(b + c0);
      const __m512 rs = _mm512_loadu_ps(rstd + c0), mdb = _mm512_loadu_ps(mean_dbias + c0);
      const __m512 mds = _mm512_loadu_ps(mean_dscale + c0);
      for (int64_t jw = 0; jw < s.w; ++jw) {
        const float* xp = xrow + jw * c + c0;
        const __m512 xv = _mm512_loadu_ps(xp);
        __m512 g = _mm512_setzero_ps();
        if (reached && jw < s.wo * s.kw) {
          const int64_t o = (orow * s.wo + jw / s.kw) * c + c0;
          g = ScatteredV<kRelu>(xp, gy + o, code + o, static_cast<int>(wa * s.kw + jw % s.kw), m, av, bv);
        }
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(xv, m), rs);
        const __m512 t = _mm512_fnmadd_ps(xhat, mds, _mm512_sub_ps(g, mdb));
        _mm512_storeu_ps(drow + jw * c + c0, _mm512_mul_ps(av, t));
      }
    }
  }
}
#endif

void NormPoolForwardImpl(ffi::ThreadPool& pool, int64_t threads, const PoolDims& s, const float* x,
                         const float* scale, const float* bias, float* y, int8_t* code, float* mean, float* var,
                         float epsilon, bool relu) {
  std::vector<float> a(s.c);
  Statistics(pool, threads, x, scale, mean, var, a.data(), s.b * s.h * s.w, s.c, epsilon);
  const Chunks chunks(s.b * s.ho, std::max<int64_t>(1, pool.num_threads()));
  ForChunks(pool, threads, chunks, [&](int64_t i) {
#if defined(__x86_64__)
    if (s.c % 16 == 0 && HasAvx512()) {
      if (relu) NormPoolRowsAvx512<true>(s, x, y, code, mean, a.data(), bias, chunks.begin(i), chunks.end(i));
      else NormPoolRowsAvx512<false>(s, x, y, code, mean, a.data(), bias, chunks.begin(i), chunks.end(i));
      return;
    }
#endif
    NormPoolRows(s, x, y, code, mean, a.data(), bias, relu, chunks.begin(i), chunks.end(i));
  });
}

void NormPoolBackwardImpl(ffi::ThreadPool& pool, int64_t threads, const PoolDims& s, const float* x, const float* gy,
                          const int8_t* code, const float* mean, const float* var, const float* scale,
                          const float* bias, float* dx, float* dscale, float* dbias, float epsilon, bool relu) {
  const int64_t m = s.b * s.h * s.w, c = s.c;
  const BackwardFactors f(var, scale, c, epsilon);
  const float* rstd = f.rstd.data();
  const float* a = f.a.data();
  const Chunks chunks(s.b * s.h, std::max<int64_t>(1, pool.num_threads()));
#if defined(__x86_64__)
  const bool simd = c % 16 == 0 && HasAvx512();
#else
  const bool simd = false;
#endif
  std::vector<double> sums = ChannelSums(pool, threads, chunks, 2 * c, [&](int64_t i, double* acc) {
#if defined(__x86_64__)
    if (simd) {
      if (relu) {
        NormPoolGradSumsAvx512<true>(s, x, gy, code, mean, rstd, a, bias, chunks.begin(i),
                                     chunks.end(i), acc, acc + c);
      } else {
        NormPoolGradSumsAvx512<false>(s, x, gy, code, mean, rstd, a, bias, chunks.begin(i),
                                      chunks.end(i), acc, acc + c);
      }
      return;
    }
#endif
    NormPoolGradSums(s, x, gy, code, mean, rstd, a, bias, relu, chunks.begin(i), chunks.end(i), acc,
                     acc + c);
  });
  std::vector<float> mean_dbias, mean_dscale;
  FinishGradSums(sums, m, c, dbias, dscale, mean_dbias, mean_dscale);
  ForChunks(pool, threads, chunks, [&](int64_t i) {
#if defined(__x86_64__)
    if (simd) {
      if (relu) {
        NormPoolGradRowsAvx512<true>(s, x, gy, code, dx, mean, rstd, a, bias, mean_dbias.data(),
                                     mean_dscale.data(), chunks.begin(i), chunks.end(i));
      } else {
        NormPoolGradRowsAvx512<false>(s, x, gy, code, dx, mean, rstd, a, bias, mean_dbias.data(),
                                      mean_dscale.data(), chunks.begin(i), chunks.end(i));
      }
      return;
    }
#endif
    NormPoolGradRows(s, x, gy, code, dx, mean, rstd, a, bias, mean_dbias.data(), mean_dscale.data(),
                     relu, chunks.begin(i), chunks.end(i));
  });
}

// fn() with any exception turned into an internal error that starts with `what`.
template <typename Fn>
ffi::Error Guarded(const char* what, const Fn& fn) {
  try {
    fn();
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error PoolDimsOf(ffi::Span<const int64_t> d, int64_t kh, int64_t kw, PoolDims& s) {
  if (d.size() != 4) return ffi::Error::InvalidArgument("jaxcnn batch norm + max pool: x must be [B, H, W, C]");
  if (kh < 1 || kw < 1 || kh * kw > 127) {
    return ffi::Error::InvalidArgument("jaxcnn batch norm + max pool: the window must hold 1..127 elements");
  }
  s = PoolDims{d[0], d[1], d[2], d[3], kh, kw, d[1] / kh, d[2] / kw};
  return ffi::Error::Success();
}

ffi::Error NormPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> code,
                           ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var, float epsilon,
                           int64_t relu, int64_t threads, int64_t kh, int64_t kw) {
  PoolDims s;
  if (auto error = PoolDimsOf(x.dimensions(), kh, kw, s); error.failure()) return error;
  return Guarded("jaxcnn batch norm + max pool failed: ", [&] {
    NormPoolForwardImpl(pool, threads, s, x.typed_data(), scale.typed_data(), bias.typed_data(), y->typed_data(),
                        code->typed_data(), mean->typed_data(), var->typed_data(), epsilon, relu != 0);
  });
}

ffi::Error NormPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                            ffi::Buffer<ffi::S8> code, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias, float epsilon,
                            int64_t relu, int64_t threads, int64_t kh, int64_t kw) {
  PoolDims s;
  if (auto error = PoolDimsOf(x.dimensions(), kh, kw, s); error.failure()) return error;
  return Guarded("jaxcnn batch norm + max pool backward failed: ", [&] {
    NormPoolBackwardImpl(pool, threads, s, x.typed_data(), gy.typed_data(), code.typed_data(), mean.typed_data(),
                         var.typed_data(), scale.typed_data(), bias.typed_data(), dx->typed_data(),
                         dscale->typed_data(), dbias->typed_data(), epsilon, relu != 0);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormPoolFwd, NormPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<JAXCNN_F32>()             // x
                                  .Arg<JAXCNN_F32>()             // scale
                                  .Arg<JAXCNN_F32>()             // bias
                                  .Ret<JAXCNN_F32>()             // y (pooled)
                                  .Ret<ffi::Buffer<ffi::S8>>()   // code
                                  .Ret<JAXCNN_F32>()             // mean
                                  .Ret<JAXCNN_F32>()             // var
                                      JAXCNN_NORM_ATTRS.Attr<int64_t>("kh").Attr<int64_t>("kw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormPoolBwd, NormPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<JAXCNN_F32>()             // x
                                  .Arg<JAXCNN_F32>()             // g (pooled)
                                  .Arg<ffi::Buffer<ffi::S8>>()   // code
                                  .Arg<JAXCNN_F32>()             // mean
                                  .Arg<JAXCNN_F32>()             // var
                                  .Arg<JAXCNN_F32>()             // scale
                                  .Arg<JAXCNN_F32>()             // bias
                                  .Ret<JAXCNN_F32>()             // dx
                                  .Ret<JAXCNN_F32>()             // dscale
                                  .Ret<JAXCNN_F32>()             // dbias
                                      JAXCNN_NORM_ATTRS.Attr<int64_t>("kh").Attr<int64_t>("kw"));
