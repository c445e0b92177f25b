// bfloat16 <-> float32 on 16 values at a time in AVX-512, bit for bit as bfloat16.h's Widen and Narrow (and so as XLA
// converts), for the native kernels' bfloat16 loops (batch_norm.cc, add.cc). x86-64 only; callers check HasAvx512().

#ifndef JAXCNN_BFLOAT16_AVX512_H_
#define JAXCNN_BFLOAT16_AVX512_H_

#if defined(__x86_64__)

#include <cpuid.h>
#include <immintrin.h>

#include <cstdint>

#include "env_switch.h"

#define JAXCNN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace jaxcnn {

// Whether this CPU runs the AVX-512 loops (F, BW and VL).
inline bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

// Whether the CPU has AVX512-BF16: CPUID leaf 7, sub-leaf 1, EAX bit 5 (read directly, so that compilers whose
// __builtin_cpu_supports predates the name still build this file).
inline bool CpuHasAvx512Bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  return (eax >> 5) & 1u;
}

// Whether StoreBf16<true> may run: the CPU has AVX-512 and AVX512-BF16, and JAXCNN_AVX512_BF16 is not 0 / false /
// no / off (env_switch.h; read once), which keeps the integer rounding (the same bits; tests/backends/test_norm.py
// compares the two).
inline bool Avx512Bf16Rounding() {
  static const bool on = HasAvx512() && CpuHasAvx512Bf16() && SwitchOn("JAXCNN_AVX512_BF16");
  return on;
}

// 16 bfloat16 values widened (Widen).
JAXCNN_AVX512 inline __m512 LoadBf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 16 floats rounded to bfloat16 as Narrow does (nearest even, NaN kept and made quiet), with vector integer
// operations.
JAXCNN_AVX512 inline __m256i NarrowIntV(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd);
  const __m512i rounded = _mm512_srli_epi32(biased, 16);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet_nan));
}

// 16 floats rounded to bfloat16 (Narrow's bits) and stored. kCvt: with AVX512-BF16's vcvtneps2bf16 (one instruction
// instead of eleven; the same rounding, but it flushes subnormal inputs to zero, so a vector holding one takes the
// integer rounding). Written as inline assembly so that the loops calling this need no AVX512-BF16 target of their
// own: only their kCvt = true copies, run where Avx512Bf16Rounding() holds, execute the instruction (the mnemonic needs
// GNU as 2.32 or later).
template <bool kCvt>
JAXCNN_AVX512 inline void StoreBf16(uint16_t* p, __m512 v) {
  __m256i out;
  if constexpr (kCvt) {
    const __m512i bits = _mm512_castps_si512(v);
    const __mmask16 subnormal = _mm512_mask_test_epi32_mask(
        _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000)), bits, _mm512_set1_epi32(0x007fffff));
    if (__builtin_expect(subnormal == 0, 1)) {
      asm("vcvtneps2bf16 %1, %0" : "=v"(out) : "v"(v));
    } else {
      out = NarrowIntV(v);
    }
  } else {
    out = NarrowIntV(v);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), out);
}

}  // namespace jaxcnn

#endif  // defined(__x86_64__)

#endif  // JAXCNN_BFLOAT16_AVX512_H_
