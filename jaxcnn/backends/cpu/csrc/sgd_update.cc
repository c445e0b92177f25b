// SGD with momentum (optionally Nesterov's) and L2 weight decay, as one pass over every parameter of a model, on
// XLA's own intra-op thread pool. XLA's CPU backend ran optax's update of the MLP's 784x300 weight as three loop
// fusions (the decayed gradient, the new momentum, the new parameter: ten array passes) plus the scheduling
// between them, about 100 us of a 1 ms step on 2 cores; this reads each parameter, momentum and gradient once
// and writes the new parameter and momentum once (five passes). jaxcnn/train/optim.py calls it through
// jaxcnn/nn/onednn.py (`sgd_update`); built into the same library as onednn_conv.cc.
//
// One XLA FFI handler:
//   JaxcnnSgdUpdate (step, p_0, m_0, g_0, p_1, m_1, g_1, ...) -> (p_0', m_0', p_1', m_1', ...)
// step: float32 scalar, the signed step size (-learning rate); every p_i, m_i, g_i float32 of one shape.
// Attributes: momentum (float), nesterov (0 / 1), decay (float per leaf: its weight decay, 0 for none), simd (the
// widest vector loop allowed: 2 AVX-512, 1 AVX2 + FMA, 0 the portable loop; for tests of each path).
// Per element, in optax's order (optax.chain(add_decayed_weights(decay), sgd(lr, momentum, nesterov))), with
// each multiply feeding an add as one fused multiply-add, as XLA's CPU backend compiles optax's update (LLVM
// contracts them): fma(a, b, c) = a * b + c rounded once,
//   d = fma(p, decay, g) (g where decay is 0);  m' = fma(m, momentum, d);
//   u = nesterov ? fma(m', momentum, d) : m';  p' = fma(u, step, p)
// so the results are the bits XLA gives for optax's update (tests/train/test_fused_sgd.py checks both against a
// NumPy reference of these formulas and against optax under jax.jit).

#include <algorithm>
#include <cmath>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Leaf {
  const float* p;
  const float* m;
  const float* g;
  float* p_out;
  float* m_out;
  float decay;
};

// The loops read each element of p, m and g before writing p' and m' at the same index, so the results may be
// the operands' own buffers (jaxcnn/nn/onednn.py aliases p' to p and m' to m: XLA then updates the state in
// place instead of copying new arrays into the training loop's state).
template <bool kNesterov, bool kDecay>
inline void UpdateSpanPortable(const Leaf& leaf, int64_t begin, int64_t end, float step, float momentum) {
  for (int64_t i = begin; i < end; ++i) {
    float p = leaf.p[i], m = leaf.m[i], g = leaf.g[i];
    float d = kDecay ? std::fma(p, leaf.decay, g) : g;
    float mi = std::fma(m, momentum, d);
    float u = kNesterov ? std::fma(mi, momentum, d) : mi;
    leaf.m_out[i] = mi;
    leaf.p_out[i] = std::fma(u, step, p);
  }
}

#if defined(__x86_64__)
#define JAXCNN_AVX512 __attribute__((target("avx512f")))
#define JAXCNN_AVX2 __attribute__((target("avx2,fma")))

// The same operations on 16 lanes (a masked tail), so the same bits.
template <bool kNesterov, bool kDecay>
JAXCNN_AVX512 inline void UpdateSpanAvx512(const Leaf& leaf, int64_t begin, int64_t end, float step,
                                           float momentum) {
  const __m512 decay = _mm512_set1_ps(leaf.decay), mu = _mm512_set1_ps(momentum), lr = _mm512_set1_ps(step);
  for (int64_t i = begin; i < end; i += 16) {
    const int64_t left = end - i;
    const __mmask16 lanes = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u);
    __m512 p = _mm512_maskz_loadu_ps(lanes, leaf.p + i);
    __m512 m = _mm512_maskz_loadu_ps(lanes, leaf.m + i);
    __m512 g = _mm512_maskz_loadu_ps(lanes, leaf.g + i);
    __m512 d = kDecay ? _mm512_fmadd_ps(p, decay, g) : g;
    __m512 mi = _mm512_fmadd_ps(m, mu, d);
    __m512 u = kNesterov ? _mm512_fmadd_ps(mi, mu, d) : mi;
    _mm512_mask_storeu_ps(leaf.m_out + i, lanes, mi);
    _mm512_mask_storeu_ps(leaf.p_out + i, lanes, _mm512_fmadd_ps(u, lr, p));
  }
}

// On 8 lanes for machines with AVX2 and FMA but not AVX-512; the tail on the portable loop (std::fma: the same
// rounding).
template <bool kNesterov, bool kDecay>
JAXCNN_AVX2 inline void UpdateSpanAvx2(const Leaf& leaf, int64_t begin, int64_t end, float step, float momentum) {
  const __m256 decay = _mm256_set1_ps(leaf.decay), mu = _mm256_set1_ps(momentum), lr = _mm256_set1_ps(step);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 p = _mm256_loadu_ps(leaf.p + i), m = _mm256_loadu_ps(leaf.m + i), g = _mm256_loadu_ps(leaf.g + i);
    __m256 d = kDecay ? _mm256_fmadd_ps(p, decay, g) : g;
    __m256 mi = _mm256_fmadd_ps(m, mu, d);
    __m256 u = kNesterov ? _mm256_fmadd_ps(mi, mu, d) : mi;
    _mm256_storeu_ps(leaf.m_out + i, mi);
    _mm256_storeu_ps(leaf.p_out + i, _mm256_fmadd_ps(u, lr, p));
  }
  UpdateSpanPortable<kNesterov, kDecay>(leaf, i, end, step, momentum);
}

// The widest vector loop this CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 none.
int VectorLevel() {
  static const int level = __builtin_cpu_supports("avx512f")                                 ? 2
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1
                                                                                                : 0;
  return level;
}
#else
int VectorLevel() { return 0; }
#endif

template <bool kNesterov, bool kDecay>
void UpdateSpan(const Leaf& leaf, int64_t begin, int64_t end, float step, float momentum, int level) {
#if defined(__x86_64__)
  if (level == 2) return UpdateSpanAvx512<kNesterov, kDecay>(leaf, begin, end, step, momentum);
  if (level == 1) return UpdateSpanAvx2<kNesterov, kDecay>(leaf, begin, end, step, momentum);
#endif
  UpdateSpanPortable<kNesterov, kDecay>(leaf, begin, end, step, momentum);
}

// Elements [begin, end) of one leaf.
struct Span {
  int64_t leaf, begin, end;
};

void UpdateLeaf(const Leaf& leaf, int64_t begin, int64_t end, float step, float momentum, bool nesterov,
                int level) {
  // A leaf without decay takes g itself, as optax's mask leaves it (not g + 0 * p: NaN for an infinite p).
  const bool decay = leaf.decay != 0.0f;
  if (nesterov && decay) UpdateSpan<true, true>(leaf, begin, end, step, momentum, level);
  if (nesterov && !decay) UpdateSpan<true, false>(leaf, begin, end, step, momentum, level);
  if (!nesterov && decay) UpdateSpan<false, true>(leaf, begin, end, step, momentum, level);
  if (!nesterov && !decay) UpdateSpan<false, false>(leaf, begin, end, step, momentum, level);
}

ffi::Error SgdUpdate(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> step_buffer, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, float momentum, int64_t nesterov, ffi::Span<const float> decay,
                     int64_t simd) {
  if (step_buffer.element_count() != 1) {
    return ffi::Error::InvalidArgument("jaxcnn sgd_update: the step size must be a scalar");
  }
  const int64_t n = static_cast<int64_t>(decay.size());
  if (static_cast<int64_t>(args.size()) != 3 * n || static_cast<int64_t>(rets.size()) != 2 * n) {
    return ffi::Error::InvalidArgument("jaxcnn sgd_update: expected 3 operands and 2 results per leaf (" +
                                       std::to_string(n) + " leaves), got " + std::to_string(args.size()) +
                                       " operands and " + std::to_string(rets.size()) + " results");
  }
  std::vector<Leaf> leaves(n);
  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const float* in[3];
    int64_t size = -1;
    for (int j = 0; j < 3; ++j) {
      auto buf = args.get<ffi::AnyBuffer>(3 * i + j);
      if (!buf.has_value()) return buf.error();
      if (buf->element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("jaxcnn sgd_update: every operand must be float32");
      }
      int64_t count = static_cast<int64_t>(buf->element_count());
      if (size >= 0 && count != size) {
        return ffi::Error::InvalidArgument("jaxcnn sgd_update: leaf " + std::to_string(i) +
                                           ": parameter, momentum and gradient differ in size");
      }
      size = count;
      in[j] = static_cast<const float*>(buf->untyped_data());
    }
    float* out[2];
    for (int j = 0; j < 2; ++j) {
      auto buf = rets.get<ffi::AnyBuffer>(2 * i + j);
      if (!buf.has_value()) return buf.error();
      if ((*buf)->element_type() != ffi::DataType::F32 || static_cast<int64_t>((*buf)->element_count()) != size) {
        return ffi::Error::InvalidArgument("jaxcnn sgd_update: leaf " + std::to_string(i) +
                                           ": results must be float32 of the parameter's size");
      }
      out[j] = static_cast<float*>((*buf)->untyped_data());
    }
    leaves[i] = Leaf{in[0], in[1], in[2], out[0], out[1], decay[i]};
    offsets[i + 1] = offsets[i] + size;
  }
  const float step = *step_buffer.typed_data();
  const bool nest = nesterov != 0;
  // simd: the widest loop up to that level (0 portable, 1 AVX2, 2 AVX-512), for tests of every path here.
  const int level = static_cast<int>(std::min<int64_t>(std::max<int64_t>(simd, 0), VectorLevel()));
  // Leaf by leaf: a leaf of at least kSplit elements per group is cut into `groups` equal spans (multiples of 16),
  // span t in group t, the same rows the matmul's row-split filter gradient writes and its depth-split forward
  // reads from the thread of group t (parallel_for.h); smaller leaves go whole to the group with least work. At
  // least 16k elements (64 KiB of each array) per group: a small model's update stays on one thread.
  constexpr int64_t kSplit = 4096, kGrain = 16384;
  const int64_t groups = std::max<int64_t>(
      1, std::min<int64_t>(jaxcnn::Participants(pool, std::numeric_limits<int64_t>::max()), offsets[n] / kGrain));
  std::vector<std::vector<Span>> spans(groups);
  std::vector<int64_t> work(groups, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t size = offsets[i + 1] - offsets[i];
    if (groups > 1 && size >= groups * kSplit) {
      for (int64_t t = 0; t < groups; ++t) {
        const int64_t lo = t == 0 ? 0 : (t * size / groups) / 16 * 16;
        const int64_t hi = t + 1 == groups ? size : ((t + 1) * size / groups) / 16 * 16;
        spans[t].push_back(Span{i, lo, hi});
        work[t] += hi - lo;
      }
    } else if (size > 0) {
      const int64_t t = std::min_element(work.begin(), work.end()) - work.begin();
      spans[t].push_back(Span{i, 0, size});
      work[t] += size;
    }
  }
  std::vector<Span> items;
  std::vector<int64_t> group_offsets{0};
  for (const auto& group : spans) {
    items.insert(items.end(), group.begin(), group.end());
    group_offsets.push_back(static_cast<int64_t>(items.size()));
  }
  jaxcnn::ParallelForGroups(pool, group_offsets, [&](int64_t item) {
    const Span& span = items[item];
    UpdateLeaf(leaves[span.leaf], span.begin, span.end, step, momentum, nest, level);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnSgdUpdate, SgdUpdate,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("momentum")
                                  .Attr<int64_t>("nesterov")
                                  .Attr<ffi::Span<const float>>("decay")
                                  .Attr<int64_t>("simd"));
