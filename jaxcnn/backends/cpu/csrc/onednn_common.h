// What onednn_conv.cc and onednn_norm.cc share (one library; jaxcnn/nn/onednn.py compiles them together).

#ifndef JAXCNN_ONEDNN_COMMON_H_
#define JAXCNN_ONEDNN_COMMON_H_

#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"

namespace jaxcnn {

// The CPU engine every primitive of the library is built and run on (one per process).
inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// OpenMP's thread count as the process started (OMP_NUM_THREADS, else the cores), read when the library loads.
inline const int kDefaultThreads = omp_get_max_threads();

// oneDNN sizes its work split when a primitive is built and runs it with that many threads: set the calling
// thread's OpenMP thread count before both. The count is per thread and sticks, and XLA runs custom calls on
// whichever of its threads is free, so 0 (all) must set the default back, not leave what an earlier call set.
inline void SetThreads(int64_t threads) {
  omp_set_num_threads(threads > 0 ? static_cast<int>(threads) : kDefaultThreads);
}

// Held while a primitive that uses every core runs (threads == 0): XLA runs independent operations of a step at
// once, and two OpenMP teams of every core each, spinning at their barriers, slowed both calls about 8x
// (LeNet-5's two input-side gradients of its second conv: 4.1 ms each, against 0.5-0.7 ms one after the other).
// Primitives given a share of the cores (threads > 0: several devices in one process) run concurrently.
class AllCoresGuard {
 public:
  explicit AllCoresGuard(int64_t threads) : lock_(Mutex(), std::defer_lock) {
    if (threads <= 0) lock_.lock();
  }

 private:
  static std::mutex& Mutex() {
    static std::mutex mutex;
    return mutex;
  }
  std::unique_lock<std::mutex> lock_;
};

// err's message into the caller's buffer of error_len bytes (NUL-terminated), for the ctypes queries.
inline void CopyError(const std::exception& err, char* error, int64_t error_len) {
  std::strncpy(error, err.what(), static_cast<size_t>(error_len - 1));
  error[error_len - 1] = '\0';
}

}  // namespace jaxcnn

#endif  // JAXCNN_ONEDNN_COMMON_H_
