// Max pooling over non-overlapping windows (strides equal to the window, no padding) for XLA's CPU backend: one
// pass over the input forward, one pass over the gradient backward, on XLA's own intra-op thread pool (no OpenMP
// team). Built into the same library as onednn_conv.cc, though it uses no oneDNN; jaxcnn/nn/fast_pool.py wraps
// both handlers in derivative rules.
//
// Two XLA FFI handlers; activations are channels-last, x [B, H, W, C] (B: every leading axis together):
//   JaxcnnMaxPoolFwd (x) -> y [B, Ho, Wo, C] f32, code [B, Ho, Wo, C] s8
//   JaxcnnMaxPoolBwd (g [B, Ho, Wo, C], code) -> dx [B, H, W, C]
// with Ho = H / kh, Wo = W / kw (rows and columns past the last whole window are dropped forward and get a zero
// gradient). Attributes: "kh", "kw" (int64, kh * kw <= 127), "simd" (int64: 1 = AVX-512 (F, BW, VL) where the
// CPU has it, 0 = the portable loop; both give the same bits).
//
// The choice in each window is XLA's select-and-scatter's with `>=` (and jaxcnn.nn.fast_pool's): scan the window
// row by row, start with the first element and move to each later one that the current choice is not >= to (the
// first maximum for ordinary numbers). y is the NaN-propagating maximum. `code` is the chosen element's row-major
// index in its window. Backward: dx at a window's chosen element is g, every other element 0.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct PoolShape {
  int64_t b, h, w, c, kh, kw, ho, wo;
};

// x's dimensions and the window -> the shape, or an error for what the Python side never sends.
ffi::Error ShapeOf(ffi::Span<const int64_t> x_dims, int64_t kh, int64_t kw, PoolShape& s) {
  if (x_dims.size() < 3) return ffi::Error::InvalidArgument("max pool: x must be [..., H, W, C]");
  if (kh < 1 || kw < 1 || kh * kw > 127) return ffi::Error::InvalidArgument("max pool: window must hold 1..127");
  size_t r = x_dims.size();
  s.b = 1;
  for (size_t i = 0; i + 3 < r; ++i) s.b *= x_dims[i];
  s.h = x_dims[r - 3];
  s.w = x_dims[r - 2];
  s.c = x_dims[r - 1];
  s.kh = kh;
  s.kw = kw;
  s.ho = s.h / kh;
  s.wo = s.w / kw;
  return ffi::Error::Success();
}

// ---- portable loops --------------------------------------------------------------------------------------

inline float MaxNan(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? a + b : (a < b ? b : a); }

void ForwardRowsScalar(const PoolShape& s, const float* x, float* y, int8_t* code, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {  // r = b * ho + i
    int64_t bi = r / s.ho, oi = r % s.ho;
    const float* rows = x + (bi * s.h + oi * s.kh) * s.w * s.c;
    float* yr = y + r * s.wo * s.c;
    int8_t* cr = code + r * s.wo * s.c;
    for (int64_t oj = 0; oj < s.wo; ++oj) {
      for (int64_t ch = 0; ch < s.c; ++ch) {
        float first = rows[(oj * s.kw) * s.c + ch];
        float best = first, out = first;
        int k_best = 0;
        for (int64_t k = 1; k < s.kh * s.kw; ++k) {
          int64_t a = k / s.kw, bb = k % s.kw;
          float v = rows[(a * s.w + oj * s.kw + bb) * s.c + ch];
          if (!(best >= v)) {
            best = v;
            k_best = static_cast<int>(k);
          }
          out = MaxNan(out, v);
        }
        yr[oj * s.c + ch] = out;
        cr[oj * s.c + ch] = static_cast<int8_t>(k_best);
      }
    }
  }
}

void BackwardRowsScalar(const PoolShape& s, const float* g, const int8_t* code, float* dx, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t bi = r / s.ho, oi = r % s.ho;
    const float* gr = g + r * s.wo * s.c;
    const int8_t* cr = code + r * s.wo * s.c;
    for (int64_t a = 0; a < s.kh; ++a) {
      float* dxr = dx + ((bi * s.h + oi * s.kh + a) * s.w) * s.c;
      for (int64_t oj = 0; oj < s.wo; ++oj) {
        for (int64_t bb = 0; bb < s.kw; ++bb) {
          int k = static_cast<int>(a * s.kw + bb);
          float* d = dxr + (oj * s.kw + bb) * s.c;
          for (int64_t ch = 0; ch < s.c; ++ch) d[ch] = cr[oj * s.c + ch] == k ? gr[oj * s.c + ch] : 0.0f;
        }
      }
      std::memset(dxr + s.wo * s.kw * s.c, 0, (s.w - s.wo * s.kw) * s.c * sizeof(float));
    }
  }
}

// ---- AVX-512 ---------------------------------------------------------------------------------------------

#if defined(__x86_64__)
#define JAXCNN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

JAXCNN_AVX512 inline __mmask16 Lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u);
}

// One window position's scan over 16 lanes of candidates, in window order (see the top of the file).
struct Scan {
  __m512 best, out;
  __m512i k;
};

JAXCNN_AVX512 inline void Start(Scan& s, __m512 v) {
  s.best = s.out = v;
  s.k = _mm512_setzero_si512();
}

JAXCNN_AVX512 inline void Step(Scan& s, __m512 v, int k) {
  __mmask16 move = static_cast<__mmask16>(~_mm512_cmp_ps_mask(s.best, v, _CMP_GE_OQ));
  s.best = _mm512_mask_mov_ps(s.best, move, v);
  s.k = _mm512_mask_mov_epi32(s.k, move, _mm512_set1_epi32(k));
  __mmask16 nan = _mm512_cmp_ps_mask(s.out, v, _CMP_UNORD_Q);
  s.out = _mm512_mask_mov_ps(_mm512_max_ps(s.out, v), nan, _mm512_add_ps(s.out, v));
}

JAXCNN_AVX512 inline void Finish(const Scan& s, float* y, int8_t* code, __mmask16 m) {
  _mm512_mask_storeu_ps(y, m, s.out);
  _mm512_mask_cvtepi32_storeu_epi8(code, m, s.k);
}

// Windows per vector when channels are few: P windows side by side (P * C lanes), their inputs (P * kw * C
// floats) within two vectors, so that a permute picks each candidate column. 0: one window per vector.
int64_t WindowsPerVector(const PoolShape& s) {
  if (s.c >= 16 || s.kw * s.c > 32) return 0;
  int64_t p = std::min<int64_t>(16 / s.c, 32 / (s.kw * s.c));
  return p >= 2 ? p : 0;
}

// Lane l of the packed layout holds window l / C, channel l % C; column j of that window's input sits at
// (l / C) * kw * C + j * C + l % C of the two vectors. Lanes past P * C read 0.
JAXCNN_AVX512 inline __m512i PackedIndex(const PoolShape& s, int64_t p, int64_t j) {
  alignas(64) int32_t idx[16] = {0};
  for (int64_t l = 0; l < p * s.c; ++l) idx[l] = static_cast<int32_t>((l / s.c) * s.kw * s.c + j * s.c + l % s.c);
  return _mm512_load_si512(idx);
}

JAXCNN_AVX512 void ForwardRowsAvx512(const PoolShape& s, const float* x, float* y, int8_t* code, int64_t r0,
                                     int64_t r1) {
  const int64_t p = WindowsPerVector(s);
  __m512i column[127];
  for (int64_t j = 0; p && j < s.kw; ++j) column[j] = PackedIndex(s, p, j);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t bi = r / s.ho, oi = r % s.ho;
    const float* rows = x + (bi * s.h + oi * s.kh) * s.w * s.c;
    float* yr = y + r * s.wo * s.c;
    int8_t* cr = code + r * s.wo * s.c;
    if (p) {
      for (int64_t oj = 0; oj < s.wo; oj += p) {
        int64_t windows = std::min(p, s.wo - oj), span = windows * s.kw * s.c;
        __mmask16 lo_mask = Lanes(span), hi_mask = Lanes(std::max<int64_t>(0, span - 16));
        Scan scan;
        for (int64_t a = 0; a < s.kh; ++a) {
          const float* src = rows + a * s.w * s.c + oj * s.kw * s.c;
          __m512 lo = _mm512_maskz_loadu_ps(lo_mask, src), hi = _mm512_maskz_loadu_ps(hi_mask, src + 16);
          for (int64_t j = 0; j < s.kw; ++j) {
            __m512 v = _mm512_permutex2var_ps(lo, column[j], hi);
            if (a == 0 && j == 0) Start(scan, v);
            else Step(scan, v, static_cast<int>(a * s.kw + j));
          }
        }
        Finish(scan, yr + oj * s.c, cr + oj * s.c, Lanes(windows * s.c));
      }
      continue;
    }
    for (int64_t oj = 0; oj < s.wo; ++oj) {
      for (int64_t c0 = 0; c0 < s.c; c0 += 16) {
        __mmask16 m = Lanes(s.c - c0);
        const float* base = rows + (oj * s.kw) * s.c + c0;
        Scan scan;
        Start(scan, _mm512_maskz_loadu_ps(m, base));
        for (int64_t k = 1; k < s.kh * s.kw; ++k) {
          int64_t a = k / s.kw, j = k % s.kw;
          Step(scan, _mm512_maskz_loadu_ps(m, base + (a * s.w + j) * s.c), static_cast<int>(k));
        }
        Finish(scan, yr + oj * s.c + c0, cr + oj * s.c + c0, m);
      }
    }
  }
}

JAXCNN_AVX512 void BackwardRowsAvx512(const PoolShape& s, const float* g, const int8_t* code, float* dx,
                                      int64_t r0, int64_t r1) {
  const int64_t p = WindowsPerVector(s);
  // Packed layout, backward: output float q of a group (q < P * kw * C) is column j = (q / C) % kw of window
  // q / (kw * C), channel q % C, i.e. lane (q / (kw * C)) * C + q % C of column j's vector.
  __m512i lane[2];
  __mmask16 from_column[2][127];
  if (p) {
    for (int half = 0; half < 2; ++half) {
      alignas(64) int32_t idx[16] = {0};
      for (int64_t j = 0; j < s.kw; ++j) from_column[half][j] = 0;
      for (int64_t t = 0; t < 16; ++t) {
        int64_t q = half * 16 + t;
        if (q >= p * s.kw * s.c) continue;
        idx[t] = static_cast<int32_t>((q / (s.kw * s.c)) * s.c + q % s.c);
        from_column[half][(q / s.c) % s.kw] |= static_cast<__mmask16>(1u << t);
      }
      lane[half] = _mm512_load_si512(idx);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t bi = r / s.ho, oi = r % s.ho;
    const float* gr = g + r * s.wo * s.c;
    const int8_t* cr = code + r * s.wo * s.c;
    for (int64_t a = 0; a < s.kh; ++a) {
      float* dxr = dx + ((bi * s.h + oi * s.kh + a) * s.w) * s.c;
      if (p) {
        for (int64_t oj = 0; oj < s.wo; oj += p) {
          int64_t windows = std::min(p, s.wo - oj), span = windows * s.kw * s.c;
          __mmask16 m = Lanes(windows * s.c);
          __m512 gv = _mm512_maskz_loadu_ps(m, gr + oj * s.c);
          __m512i kv = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, cr + oj * s.c));
          __m512 out[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int64_t j = 0; j < s.kw; ++j) {
            __mmask16 hit = _mm512_cmpeq_epi32_mask(kv, _mm512_set1_epi32(static_cast<int>(a * s.kw + j)));
            __m512 col = _mm512_maskz_mov_ps(hit, gv);
            for (int half = 0; half < 2; ++half) {
              out[half] = _mm512_mask_permutexvar_ps(out[half], from_column[half][j], lane[half], col);
            }
          }
          float* dst = dxr + oj * s.kw * s.c;
          _mm512_mask_storeu_ps(dst, Lanes(span), out[0]);
          _mm512_mask_storeu_ps(dst + 16, Lanes(std::max<int64_t>(0, span - 16)), out[1]);
        }
      } else {
        for (int64_t oj = 0; oj < s.wo; ++oj) {
          for (int64_t c0 = 0; c0 < s.c; c0 += 16) {
            __mmask16 m = Lanes(s.c - c0);
            __m512 gv = _mm512_maskz_loadu_ps(m, gr + oj * s.c + c0);
            __m512i kv = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, cr + oj * s.c + c0));
            for (int64_t j = 0; j < s.kw; ++j) {
              __mmask16 hit = _mm512_cmpeq_epi32_mask(kv, _mm512_set1_epi32(static_cast<int>(a * s.kw + j)));
              _mm512_mask_storeu_ps(dxr + (oj * s.kw + j) * s.c + c0, m, _mm512_maskz_mov_ps(hit, gv));
            }
          }
        }
      }
      std::memset(dxr + s.wo * s.kw * s.c, 0, (s.w - s.wo * s.kw) * s.c * sizeof(float));
    }
  }
}

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl");
  return has;
}
#else
bool HasAvx512() { return false; }
#endif

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::S8> code, int64_t kh, int64_t kw, int64_t simd) {
  PoolShape s;
  if (ffi::Error err = ShapeOf(x.dimensions(), kh, kw, s); err.failure()) return err;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  int8_t* cp = code->typed_data();
  bool vector = simd && HasAvx512();
  int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.wo * s.c * s.kh * s.kw));
  jaxcnn::ParallelFor(pool, s.b * s.ho, grain, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if (vector) return ForwardRowsAvx512(s, xp, yp, cp, r0, r1);
#endif
    ForwardRowsScalar(s, xp, yp, cp, r0, r1);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S8> code,
                    ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t simd) {
  PoolShape s;
  if (ffi::Error err = ShapeOf(dx->dimensions(), kh, kw, s); err.failure()) return err;
  const float* gp = g.typed_data();
  const int8_t* cp = code.typed_data();
  float* dxp = dx->typed_data();
  if (s.ho == 0) {  // no whole window: every gradient is 0
    std::memset(dxp, 0, s.b * s.h * s.w * s.c * sizeof(float));
    return ffi::Error::Success();
  }
  bool vector = simd && HasAvx512();
  int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.w * s.c * s.kh));
  jaxcnn::ParallelFor(pool, s.b * s.ho, grain, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if (vector) return BackwardRowsAvx512(s, gp, cp, dxp, r0, r1);
#endif
    BackwardRowsScalar(s, gp, cp, dxp, r0, r1);
  });
  // Rows past the last whole window (H % kh of them per image) get no gradient.
  int64_t tail = s.h - s.ho * s.kh;
  if (tail > 0) {
    for (int64_t bi = 0; bi < s.b; ++bi) {
      std::memset(dxp + (bi * s.h + s.ho * s.kh) * s.w * s.c, 0, tail * s.w * s.c * sizeof(float));
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnMaxPoolFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("simd"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnMaxPoolBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("simd"));
