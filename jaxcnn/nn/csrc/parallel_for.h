// Splitting a custom call's work over XLA's own intra-op thread pool (no OpenMP team), for max_pool.cc and
// onednn_matmul.cc.

#ifndef JAXCNN_PARALLEL_FOR_H_
#define JAXCNN_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxcnn {

// Runs fn(begin, end) over [0, n) in chunks, on the calling thread and on XLA's thread pool. Chunks are claimed
// from a shared counter, so the call finishes even when no pool thread ever starts a task (the pool may run tasks
// on the caller, or be busy): the caller claims whatever is left and waits only for chunks already being run.
// At least `grain` items per chunk, at most `per_thread` chunks per thread of the pool. An exception thrown by fn
// (on any thread) is rethrown here, on the caller, once every chunk has finished.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, const Fn& fn, int64_t per_thread = 4) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, per_thread * threads);
  if (threads <= 1 || chunks <= 1) {
    fn(0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex error_mutex;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  const int64_t step = (n + chunks - 1) / chunks;
  // A task claims chunks until none is left. One that starts after the call returned claims none, so it never
  // touches `fn` (the caller's), only `shared`, which it co-owns.
  auto claim = [chunks, step, n](Shared& sh, const Fn& f) {
    for (int64_t i; (i = sh.next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      int64_t begin = i * step, end = std::min(n, begin + step);
      try {
        if (begin < end) f(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(sh.error_mutex);
        if (!sh.error) sh.error = std::current_exception();
      }
      sh.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) {
    pool.Schedule([shared, claim, f = &fn]() { claim(*shared, *f); });
  }
  claim(*shared, fn);
  while (shared->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  if (shared->error) std::rethrow_exception(shared->error);
}

}  // namespace jaxcnn

#endif  // JAXCNN_PARALLEL_FOR_H_
