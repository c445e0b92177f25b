// jaxcnn's own Winograd F(4x4, 3x3) for float32 3x3 convolutions with a few channels, on AVX-512 (winograd.h).
//
// With the 6x6 input tile d, the 3x3 kernel g and the 4x4 output tile Y of one (in, out) channel pair:
//   Y = A^T [(G g G^T) . (B^T d B)] A,   dg = G^T [(A dY A^T) . (B^T d B)] G   (. elementwise, summed over tiles)
//   B^T = [4  0 -5  0 1 0]   G = [ 1/4     0    0]   A^T = [1 1  1 1  1 0]
//         [0 -4 -4  1 1 0]       [-1/6 -1/6 -1/6]         [0 1 -1 2 -2 0]
//         [0  4 -4 -1 1 0]       [-1/6  1/6 -1/6]         [0 1  1 4  4 0]
//         [0 -2 -1  2 1 0]       [1/24 1/12  1/6]         [0 1 -1 8 -8 1]
//         [0  2 -1 -2 1 0]       [1/24 -1/12 1/6]
//         [0  4  0 -5 0 1]       [   0     0    1]
// Tiles are numbered over the whole batch (image, tile row, tile column) and handled in blocks (kConvTiles for the
// convolutions, kGradTiles for the filter gradient): their transformed inputs (and, for the filter gradient,
// transformed output gradients) go to per-thread buffers of 36 x tiles x channels floats, which the products then
// read from the core's cache. Rows and columns outside
// the image (the padding) read as zeros. Kernels are transformed in double and rounded once.

#include "winograd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jaxcnn {
namespace winograd {
namespace {

constexpr double kG[6][3] = {{1.0 / 4, 0, 0},          {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                             {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};

// u[p][i][o] = (G g G^T)[p] for g[kh][kw] = w[kh][kw][i][o] (w HWIO [3, 3, ni, no]), in double, rounded once;
// the loops run along o, contiguous in w and u.
void TransformHWIO(const float* w, int64_t ni, int64_t no, float* u) {
  std::vector<double> gw(6 * 3 * no);  // (G g)[a][kw][o] for one i
  for (int64_t i = 0; i < ni; ++i) {
    for (int a = 0; a < 6; ++a) {
      for (int kw = 0; kw < 3; ++kw) {
        const float* w0 = w + ((0 * 3 + kw) * ni + i) * no;
        const float* w1 = w + ((1 * 3 + kw) * ni + i) * no;
        const float* w2 = w + ((2 * 3 + kw) * ni + i) * no;
        double* out = gw.data() + (a * 3 + kw) * no;
        for (int64_t o = 0; o < no; ++o) out[o] = kG[a][0] * w0[o] + kG[a][1] * w1[o] + kG[a][2] * w2[o];
      }
    }
    for (int a = 0; a < 6; ++a) {
      const double* g0 = gw.data() + (a * 3 + 0) * no;
      const double* g1 = gw.data() + (a * 3 + 1) * no;
      const double* g2 = gw.data() + (a * 3 + 2) * no;
      for (int b = 0; b < 6; ++b) {
        float* out = u + ((a * 6 + b) * ni + i) * no;
        for (int64_t o = 0; o < no; ++o) {
          out[o] = static_cast<float>(g0[o] * kG[b][0] + g1[o] * kG[b][1] + g2[o] * kG[b][2]);
        }
      }
    }
  }
}

}  // namespace

void TransformKernel(const float* w, int64_t cin, int64_t cout, float* u) { TransformHWIO(w, cin, cout, u); }

void TransformKernelForInputGrad(const float* w, int64_t cin, int64_t cout, float* u) {
  // dx = the convolution of dy with w'[kh][kw][o][i] = w[2 - kh][2 - kw][i][o].
  std::vector<float> turned(9 * cin * cout);
  for (int kh = 0; kh < 3; ++kh) {
    for (int kw = 0; kw < 3; ++kw) {
      const float* from = w + ((2 - kh) * 3 + (2 - kw)) * cin * cout;
      float* to = turned.data() + (kh * 3 + kw) * cout * cin;
      for (int64_t i = 0; i < cin; ++i) {
        for (int64_t o = 0; o < cout; ++o) to[o * cin + i] = from[i * cout + o];
      }
    }
  }
  TransformHWIO(turned.data(), cout, cin, u);
}

void FinishFilterGrad(const double* du, int64_t cin, int64_t cout, float* dw) {
  // dw[kh][kw][i][o] = sum over a, b of G[a][kh] du[a][b][i][o] G[b][kw], along o.
  std::vector<double> dg(6 * 3 * cout);  // (du G)[a][kw][o] for one i
  for (int64_t i = 0; i < cin; ++i) {
    for (int a = 0; a < 6; ++a) {
      for (int kw = 0; kw < 3; ++kw) {
        double* out = dg.data() + (a * 3 + kw) * cout;
        std::fill(out, out + cout, 0.0);
        for (int b = 0; b < 6; ++b) {
          const double* in = du + ((a * 6 + b) * cin + i) * cout;
          const double gb = kG[b][kw];
          for (int64_t o = 0; o < cout; ++o) out[o] += in[o] * gb;
        }
      }
    }
    for (int kh = 0; kh < 3; ++kh) {
      for (int kw = 0; kw < 3; ++kw) {
        float* out = dw + ((kh * 3 + kw) * cin + i) * cout;
        for (int64_t o = 0; o < cout; ++o) {
          double s = 0;
          for (int a = 0; a < 6; ++a) s += kG[a][kh] * dg[(a * 3 + kw) * cout + o];
          out[o] = static_cast<float>(s);
        }
      }
    }
  }
}

#if defined(__x86_64__)

bool Supported() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace {

// Tiles per block. A convolution's block is the product's 16 accumulators, which stay in registers; blocks of 32
// took 10-20% longer per call (C++ probe, one thread, 64 images: 16 channels 1.39-1.56 against 1.17-1.32 ms
// forward), while the filter gradient gains from 32 (64 channels 1.14-1.27 against 1.35-1.40 ms).
constexpr int kConvTiles = 16;
constexpr int kGradTiles = 32;
constexpr int kMaxTiles = kGradTiles;
constexpr int64_t kFlushBlocks = 2;  // blocks whose filter-gradient sums are kept in float32

using V = __m512;

inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V Mul(float s, V a) { return _mm512_mul_ps(_mm512_set1_ps(s), a); }
inline V Fma(float s, V a, V b) { return _mm512_fmadd_ps(_mm512_set1_ps(s), a, b); }  // s * a + b

// o = B^T z (6 -> 6), z and o strided by `zs` and `os` vectors.
inline void InputTransform1D(const V* z, int zs, V* o, int os) {
  const V z0 = z[0], z1 = z[zs], z2 = z[2 * zs], z3 = z[3 * zs], z4 = z[4 * zs], z5 = z[5 * zs];
  const V a = Fma(-4.0f, z2, z4), b = Fma(-4.0f, z1, z3);  // z4 - 4 z2, z3 - 4 z1
  const V c = Sub(z4, z2), d = Mul(2.0f, Sub(z3, z1));
  o[0] = Fma(4.0f, z0, Fma(-5.0f, z2, z4));
  o[os] = Add(a, b);
  o[2 * os] = Sub(a, b);
  o[3 * os] = Add(c, d);
  o[4 * os] = Sub(c, d);
  o[5 * os] = Fma(4.0f, z1, Fma(-5.0f, z3, z5));
}

// o = A^T m (6 -> 4).
inline void OutputTransform1D(const V* m, int ms, V* o, int os) {
  const V s12 = Add(m[ms], m[2 * ms]), d12 = Sub(m[ms], m[2 * ms]);
  const V s34 = Add(m[3 * ms], m[4 * ms]), d34 = Sub(m[3 * ms], m[4 * ms]);
  o[0] = Add(m[0], Add(s12, s34));
  o[os] = Fma(2.0f, d34, d12);
  o[2 * os] = Fma(4.0f, s34, s12);
  o[3 * os] = Add(Fma(8.0f, d34, d12), m[5 * ms]);
}

// o = A z (4 -> 6): the adjoint of OutputTransform1D.
inline void GradTransform1D(const V* z, int zs, V* o, int os) {
  const V z0 = z[0], z1 = z[zs], z2 = z[2 * zs], z3 = z[3 * zs];
  const V s02 = Add(z0, z2), s13 = Add(z1, z3);
  const V q02 = Fma(4.0f, z2, z0), q13 = Fma(8.0f, z3, Mul(2.0f, z1));  // z0 + 4 z2, 2 z1 + 8 z3
  o[0] = z0;
  o[os] = Add(s02, s13);
  o[2 * os] = Sub(s02, s13);
  o[3 * os] = Add(q02, q13);
  o[4 * os] = Sub(q02, q13);
  o[5 * os] = z3;
}

// Where tile k of the batch lies: its image and its top-left output pixel.
struct TileGrid {
  int64_t h, w, rows, cols;  // image size, tile rows and columns per image
  TileGrid(int64_t h_, int64_t w_) : h(h_), w(w_), rows((h_ + 3) / 4), cols((w_ + 3) / 4) {}
  int64_t PerImage() const { return rows * cols; }
  void Locate(int64_t k, int64_t* image, int64_t* r0, int64_t* c0) const {
    *image = k / PerImage();
    const int64_t t = k % PerImage();
    *r0 = (t / cols) * 4;
    *c0 = (t % cols) * 4;
  }
};

// A block buffer holds, for each of the 36 positions and kBlock tiles, `c` channels: [36][kBlock][c].
template <int kBlock>
inline float* At(float* block, int p, int slot, int64_t c) { return block + (p * kBlock + slot) * c; }
template <int kBlock>
inline const float* At(const float* block, int p, int slot, int64_t c) { return block + (p * kBlock + slot) * c; }

// B^T d B of tile k of x [.., h, w, c] into `block` at `slot`: each row of the 6x6 input tile transformed as it
// is loaded, then each column.
template <int kBlock>
inline void LoadInputTile(const float* x, const TileGrid& g, int64_t c, int64_t k, float* block, int slot) {
  int64_t image, r0, c0;
  g.Locate(k, &image, &r0, &c0);
  const float* base = x + image * g.h * g.w * c;
  const bool inside = r0 >= 1 && r0 + 5 <= g.h && c0 >= 1 && c0 + 5 <= g.w;  // no padding read
  for (int64_t cb = 0; cb < c; cb += kLanes) {
    V t[36];
    for (int r = 0; r < 6; ++r) {
      const int64_t row = r0 - 1 + r;
      const float* p = base + (row * g.w + c0 - 1) * c + cb;
      V d[6];
      if (inside) {
        for (int q = 0; q < 6; ++q) d[q] = _mm512_loadu_ps(p + q * c);
      } else {
        const bool row_in = row >= 0 && row < g.h;
        for (int q = 0; q < 6; ++q) {
          const int64_t col = c0 - 1 + q;
          d[q] = row_in && col >= 0 && col < g.w ? _mm512_loadu_ps(p + q * c) : _mm512_setzero_ps();
        }
      }
      InputTransform1D(d, 1, t + r * 6, 1);  // rows: d B
    }
    for (int q = 0; q < 6; ++q) {  // columns: B^T (d B)
      V o[6];
      InputTransform1D(t + q, 6, o, 1);
      for (int r = 0; r < 6; ++r) _mm512_store_ps(At<kBlock>(block, r * 6 + q, slot, c) + cb, o[r]);
    }
  }
}

// A dY A^T of tile k of dy [.., h, w, c] into `block` (of kGradTiles tiles) at `slot`.
inline void LoadGradTile(const float* dy, const TileGrid& g, int64_t c, int64_t k, float* block, int slot) {
  int64_t image, r0, c0;
  g.Locate(k, &image, &r0, &c0);
  const float* base = dy + image * g.h * g.w * c;
  for (int64_t cb = 0; cb < c; cb += kLanes) {
    V z[16], t[24], o[36];
    for (int r = 0; r < 4; ++r) {
      for (int q = 0; q < 4; ++q) {
        const int64_t row = r0 + r, col = c0 + q;
        z[r * 4 + q] = row < g.h && col < g.w ? _mm512_loadu_ps(base + (row * g.w + col) * c + cb)
                                              : _mm512_setzero_ps();
      }
    }
    for (int q = 0; q < 4; ++q) GradTransform1D(z + q, 4, t + q, 4);          // columns: A dY, 6 x 4
    for (int r = 0; r < 6; ++r) GradTransform1D(t + r * 4, 1, o + r * 6, 1);  // rows: (A dY) A^T, 6 x 6
    for (int p = 0; p < 36; ++p) _mm512_store_ps(At<kGradTiles>(block, p, slot, c) + cb, o[p]);
  }
}

// A^T M A of `block` (of kConvTiles tiles) at `slot` written to tile k of y [.., h, w, c] (its pixels inside the
// image).
inline void StoreOutputTile(const float* block, int slot, float* y, const TileGrid& g, int64_t c, int64_t k) {
  int64_t image, r0, c0;
  g.Locate(k, &image, &r0, &c0);
  float* base = y + image * g.h * g.w * c;
  for (int64_t cb = 0; cb < c; cb += kLanes) {
    V m[36], t[24], o[16];
    for (int p = 0; p < 36; ++p) m[p] = _mm512_load_ps(At<kConvTiles>(block, p, slot, c) + cb);
    for (int q = 0; q < 6; ++q) OutputTransform1D(m + q, 6, t + q, 6);        // columns: A^T M, 4 x 6
    for (int r = 0; r < 4; ++r) OutputTransform1D(t + r * 6, 1, o + r * 4, 1);  // rows: (A^T M) A, 4 x 4
    for (int r = 0; r < 4; ++r) {
      for (int q = 0; q < 4; ++q) {
        const int64_t row = r0 + r, col = c0 + q;
        if (row < g.h && col < g.w) _mm512_storeu_ps(base + (row * g.w + col) * c + cb, o[r * 4 + q]);
      }
    }
  }
}

// m[p][t][o] = sum over i of v[p][t][i] * u[p][i][o]: per position a [kConvTiles x ci] x [ci x co] product. ci is a
// constant, so that the broadcast operands of the 16 tiles are offsets from one register.
template <int64_t ci>
void MultiplyBlockT(const float* v, const float* u, float* m, int64_t co) {
  for (int p = 0; p < 36; ++p) {
    const float* vp = At<kConvTiles>(v, p, 0, ci);
    const float* up = u + p * ci * co;
    for (int64_t ob = 0; ob < co; ob += kLanes) {
      V acc[kConvTiles];
#pragma GCC unroll 16
      for (int t = 0; t < kConvTiles; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t i = 0; i < ci; ++i) {
        const V ui = _mm512_loadu_ps(up + i * co + ob);
#pragma GCC unroll 16
        for (int t = 0; t < kConvTiles; ++t) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(vp[t * ci + i]), ui, acc[t]);
      }
#pragma GCC unroll 16
      for (int t = 0; t < kConvTiles; ++t) _mm512_store_ps(At<kConvTiles>(m, p, t, co) + ob, acc[t]);
    }
  }
}

void MultiplyBlock(const float* v, const float* u, float* m, int64_t ci, int64_t co) {
  switch (ci) {
    case 16: return MultiplyBlockT<16>(v, u, m, co);
    case 32: return MultiplyBlockT<32>(v, u, m, co);
    case 48: return MultiplyBlockT<48>(v, u, m, co);
    default: return MultiplyBlockT<64>(v, u, m, co);  // CheckChannels allows no other
  }
}

// du[p][i][o] += sum over the block's first `tiles` tiles of v[p][t][i] * m[p][t][o].
void AccumulateBlock(const float* v, const float* m, int tiles, float* du, int64_t ci, int64_t co) {
  for (int p = 0; p < 36; ++p) {
    for (int64_t ib = 0; ib < ci; ib += kLanes) {
      for (int64_t ob = 0; ob < co; ob += kLanes) {
        float* dp = du + (p * ci + ib) * co + ob;
        V acc[kLanes];
#pragma GCC unroll 16
        for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_loadu_ps(dp + i * co);
        for (int t = 0; t < tiles; ++t) {
          const V mt = _mm512_load_ps(At<kGradTiles>(m, p, t, co) + ob);
          const float* vt = At<kGradTiles>(v, p, t, ci) + ib;
#pragma GCC unroll 16
          for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(vt[i]), mt, acc[i]);
        }
#pragma GCC unroll 16
        for (int i = 0; i < kLanes; ++i) _mm512_storeu_ps(dp + i * co, acc[i]);
      }
    }
  }
}

// One thread's working memory, sized for kMaxChannels and allocated on the thread's first call: two block
// buffers and the filter gradient's float32 sums over kFlushBlocks blocks.
struct Buffers {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  using Array = std::unique_ptr<float, Free>;
  static Array Allocate(int64_t values) {
    float* p = static_cast<float*>(std::aligned_alloc(64, values * sizeof(float)));
    if (p == nullptr) throw std::bad_alloc();
    return Array(p);
  }
  Array a = Allocate(kPositions * kMaxTiles * kMaxChannels);
  Array b = Allocate(kPositions * kMaxTiles * kMaxChannels);
  Array partial = Allocate(kPositions * kMaxChannels * kMaxChannels);
};

Buffers& ThreadBuffers() {
  thread_local Buffers buffers;
  return buffers;
}

void CheckChannels(int64_t cin, int64_t cout) {
  if (cin % kLanes != 0 || cout % kLanes != 0 || cin > kMaxChannels || cout > kMaxChannels || cin <= 0 ||
      cout <= 0) {
    throw std::invalid_argument("jaxcnn Winograd: channels must be multiples of 16 up to 64");
  }
}

}  // namespace

void Convolve(const float* x, const float* u, float* y, int64_t images, int64_t h, int64_t w, int64_t cin,
              int64_t cout) {
  CheckChannels(cin, cout);
  const TileGrid g(h, w);
  const int64_t total = images * g.PerImage();
  Buffers& buffers = ThreadBuffers();
  float* a = buffers.a.get();
  float* b = buffers.b.get();
  for (int64_t k0 = 0; k0 < total; k0 += kConvTiles) {
    const int tiles = static_cast<int>(std::min<int64_t>(kConvTiles, total - k0));
    for (int t = 0; t < tiles; ++t) LoadInputTile<kConvTiles>(x, g, cin, k0 + t, a, t);
    for (int t = tiles; t < kConvTiles; ++t) {
      for (int p = 0; p < 36; ++p) std::memset(At<kConvTiles>(a, p, t, cin), 0, cin * sizeof(float));
    }
    MultiplyBlock(a, u, b, cin, cout);
    for (int t = 0; t < tiles; ++t) StoreOutputTile(b, t, y, g, cout, k0 + t);
  }
}

void FilterGradTransformed(const float* x, const float* dy, double* du, int64_t images, int64_t h, int64_t w,
                           int64_t cin, int64_t cout) {
  CheckChannels(cin, cout);
  const TileGrid g(h, w);
  const int64_t total = images * g.PerImage();
  const int64_t values = KernelValues(cin, cout);
  Buffers& buffers = ThreadBuffers();
  float* a = buffers.a.get();
  float* b = buffers.b.get();
  float* partial = buffers.partial.get();
  int64_t block = 0;
  for (int64_t k0 = 0; k0 < total; k0 += kGradTiles, ++block) {
    if (block % kFlushBlocks == 0) std::memset(partial, 0, values * sizeof(float));
    const int tiles = static_cast<int>(std::min<int64_t>(kGradTiles, total - k0));
    for (int t = 0; t < tiles; ++t) {
      LoadInputTile<kGradTiles>(x, g, cin, k0 + t, a, t);
      LoadGradTile(dy, g, cout, k0 + t, b, t);
    }
    AccumulateBlock(a, b, tiles, partial, cin, cout);
    if (block % kFlushBlocks == kFlushBlocks - 1 || k0 + kGradTiles >= total) {
      for (int64_t j = 0; j < values; ++j) du[j] += partial[j];
    }
  }
}

#pragma GCC pop_options

#else  // not x86-64: Supported() is false, so jaxcnn runs oneDNN's kernels and never calls these

bool Supported() { return false; }

void Convolve(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::runtime_error("jaxcnn Winograd needs an x86-64 CPU with AVX-512");
}

void FilterGradTransformed(const float*, const float*, double*, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::runtime_error("jaxcnn Winograd needs an x86-64 CPU with AVX-512");
}

#endif

}  // namespace winograd
}  // namespace jaxcnn
