// On/off switches read from the environment by the native kernels (JAXCNN_WINOGRAD, JAXCNN_AVX512_BF16).

#ifndef JAXCNN_ENV_SWITCH_H_
#define JAXCNN_ENV_SWITCH_H_

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

namespace jaxcnn {

// False where the variable `name` is 0, false, no or off (any case, spaces around ignored, as JAXCNN_ONEDNN is
// read); true where it is unset or anything else.
inline bool SwitchOn(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return true;
  std::string s(v);
  s.erase(0, s.find_first_not_of(" \t"));
  s.erase(s.find_last_not_of(" \t") + 1);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return !(s == "0" || s == "false" || s == "no" || s == "off");
}

}  // namespace jaxcnn

#endif  // JAXCNN_ENV_SWITCH_H_
