// Shared by the CPU kernels: work split over XLA's intra-op thread pool.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace encdec {

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and the pool's (one chunk:
// the calling thread alone). Chunks are claimed from a shared counter, so the caller never waits
// on a task that has not started: a pool busy elsewhere only means the caller does more itself.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, Body body) {
  if (chunks <= 1) {
    if (chunks == 1) body(0);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, body]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      body(c);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

}  // namespace encdec
