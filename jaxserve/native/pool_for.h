// parallel_for over XLA's intra-op thread pool: items handed out through an atomic counter, the
// calling thread working too, so the call completes even when the pool runs none of the helper
// tasks; each worker has its own scratch buffer (thread_local). Returns when every item is done.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxserve_native {

struct PoolWork {
  std::function<void(int64_t, std::vector<float>&)> fn;
  int64_t total = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void drain() {
    thread_local std::vector<float> buf;
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      fn(i, buf);
      ++finished;
    }
    if (finished && done.fetch_add(finished) + finished == total) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t total,
                         std::function<void(int64_t, std::vector<float>&)> fn) {
  if (total <= 0) return;
  auto work = std::make_shared<PoolWork>();
  work->fn = std::move(fn);
  work->total = total;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->total; });
}

// The binding every kernel starts with: XLA's thread pool, then q, k, v (float32 buffers).
inline auto bind_qkv() {
  using F32 = xla::ffi::Buffer<xla::ffi::F32>;
  return xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>();
}

}  // namespace jaxserve_native
