// bfloat16 <-> float32 for the native kernels (onednn_conv.cc, batch_norm.cc), bit for bit as XLA converts.

#ifndef JAXCNN_BFLOAT16_H_
#define JAXCNN_BFLOAT16_H_

#include <cstdint>
#include <cstring>

namespace jaxcnn {

// bfloat16 -> float32: exact.
inline __attribute__((always_inline)) float Widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// float32 -> bfloat16, rounded to nearest even (NaN kept a NaN). Written without branches, so that loops storing
// bfloat16 vectorise.
inline __attribute__((always_inline)) uint16_t Narrow(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

}  // namespace jaxcnn

#endif  // JAXCNN_BFLOAT16_H_
