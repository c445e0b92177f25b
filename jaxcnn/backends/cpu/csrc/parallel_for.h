// Splitting a custom call's work over XLA's own intra-op thread pool (no OpenMP team), for max_pool.cc,
// onednn_matmul.cc, onednn_conv.cc and sgd_update.cc.
//
// Work is claimed by the CPU a thread runs on. The items of a call are cut into `groups` contiguous groups, one
// per participating thread, and a thread running on CPU c first claims the items of group c % groups, then helps
// with the others. A kernel that cuts its data the same way each call therefore touches the same part of each
// array from the same core, call after call and kernel after kernel: the MLP's first-layer weights read by the
// forward product, their gradient written by the filter-gradient product and both read and rewritten by the SGD
// update stay in one core's L2 instead of moving between the cores' caches every step (benchmarks/README.md).
// Which thread runs which item never changes a result: every item is computed the same way.

#ifndef JAXCNN_PARALLEL_FOR_H_
#define JAXCNN_PARALLEL_FOR_H_

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxcnn {

// The group a thread on this CPU works on first, of `groups` (0 where the CPU is unknown).
inline int64_t HomeGroup(int64_t groups) {
#if defined(__linux__)
  const int cpu = sched_getcpu();
  if (cpu >= 0) return cpu % groups;
#endif
  return 0;
}

// The number of threads (the caller and pool threads) a call of ParallelForGroups with `groups` groups uses.
inline int64_t Participants(xla::ffi::ThreadPool& pool, int64_t groups) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), groups));
}

// Runs fn(i) for every item i in [0, offsets.back()), on the calling thread and on XLA's thread pool; group g is
// the items [offsets[g], offsets[g + 1]). Items are claimed from one counter per group, so the call finishes even
// when no pool thread ever starts a task (the pool may run tasks on the caller, or be busy): the caller claims
// whatever is left and waits only for items already being run. An exception thrown by fn (on any thread) is
// rethrown here, on the caller, once every item has finished.
template <typename Fn>
void ParallelForGroups(xla::ffi::ThreadPool& pool, const std::vector<int64_t>& offsets, const Fn& fn) {
  const int64_t groups = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t items = groups > 0 ? offsets.back() : 0;
  if (items <= 0) return;
  const int64_t threads = Participants(pool, groups);
  if (threads <= 1 || items == 1) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  struct Shared {
    explicit Shared(const std::vector<int64_t>& o) : offsets(o), next(o.size() - 1) {
      for (size_t g = 0; g + 1 < o.size(); ++g) next[g].store(o[g], std::memory_order_relaxed);
    }
    std::vector<int64_t> offsets;
    std::vector<std::atomic<int64_t>> next;  // the next unclaimed item of each group
    std::atomic<int64_t> done{0};
    std::mutex error_mutex;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>(offsets);
  // A task claims items, its own group's first, until none is left. One that starts after the call returned
  // claims none, so it never touches `fn` (the caller's), only `shared`, which it co-owns.
  auto claim = [groups](Shared& sh, const Fn& f) {
    const int64_t home = HomeGroup(groups);
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t g = (home + k) % groups;
      for (int64_t i; (i = sh.next[g].fetch_add(1, std::memory_order_relaxed)) < sh.offsets[g + 1];) {
        try {
          f(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(sh.error_mutex);
          if (!sh.error) sh.error = std::current_exception();
        }
        sh.done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([shared, claim, f = &fn]() { claim(*shared, *f); });
  }
  claim(*shared, fn);
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  if (shared->error) std::rethrow_exception(shared->error);
}

// Runs fn(begin, end) over [0, n) in chunks of at least `grain` items, at most `per_thread` chunks per thread of
// the pool, the chunks in one contiguous group per thread (ParallelForGroups): the same rows of the same arrays
// go to the same core call after call.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, const Fn& fn, int64_t per_thread = 4) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((n + grain - 1) / grain, per_thread * threads));
  if (threads <= 1 || chunks <= 1) {
    fn(0, n);
    return;
  }
  const int64_t groups = std::min(threads, chunks);
  std::vector<int64_t> offsets(groups + 1);
  for (int64_t g = 0; g <= groups; ++g) offsets[g] = g * chunks / groups;
  const int64_t step = (n + chunks - 1) / chunks;
  ParallelForGroups(pool, offsets, [&](int64_t i) {
    const int64_t begin = i * step, end = std::min(n, begin + step);
    if (begin < end) fn(begin, end);
  });
}

}  // namespace jaxcnn

#endif  // JAXCNN_PARALLEL_FOR_H_
