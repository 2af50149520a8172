// Shared by the CPU kernels: work split between the calling thread and helpers.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace encdec {

// Helpers of our own that stay awake between calls. A decode step calls the kernels every few
// microseconds; XLA's pool threads sleep between them, and a woken one joins a call late: the
// caller reads much of the weight alone (one core streams ~12 GB/s, two ~24). A helper here
// spins for kSpinUs after its last chunk, then sleeps. Measured: a call's fixed cost 7.0 ->
// 3.5 us, a cold 512 x 512 float32 product 87 -> 77 us, the t5-small int8 step ~5% faster.
// ENCDEC_CPU_TEAM=0 keeps XLA's pool.
//
// One job at a time: the job's generation and next chunk share one atomic word, so a helper can
// only claim a chunk of the job it read (a late helper never runs a finished job's body). The
// caller claims chunks too, so a job never waits on a helper that has not started one. A forked
// child has no helpers and the parent's locks in any state: it keeps XLA's pool.
class Team {
 public:
  static Team* Get(int64_t helpers) {
    static Team* team = [helpers] {
      const char* env = std::getenv("ENCDEC_CPU_TEAM");
      if (helpers <= 0 || (env != nullptr && std::string(env) == "0")) return (Team*)nullptr;
      pthread_atfork(nullptr, nullptr, [] { forked_child() = true; });
      return new Team(helpers);  // lives for the process: its threads never join
    }();
    return forked_child() ? nullptr : team;
  }

  int64_t size() const { return (int64_t)threads_.size(); }

  // Runs fn(ctx, chunk) for every chunk on the caller and the helpers; false (nothing run) when
  // another caller holds the team.
  bool Run(int64_t chunks, void (*fn)(void*, int64_t), void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    fn_ = fn, ctx_ = ctx;
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (word_.load(std::memory_order_relaxed) >> 32) + 1;
    word_.store(gen << 32);  // seq_cst with sleeping_: a helper going to sleep sees it or is woken
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    Work(gen);
    while (done_.load(std::memory_order_acquire) < chunks) _mm_pause();
    return true;
  }

 private:
  static constexpr int64_t kSpinUs = 200;

  static bool& forked_child() {
    static bool forked = false;
    return forked;
  }

  explicit Team(int64_t helpers) {
    for (int64_t i = 0; i < helpers; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  // Claims and runs chunks of job `gen` until none is left.
  void Work(uint64_t gen) {
    for (;;) {
      uint64_t w = word_.load(std::memory_order_acquire);
      if ((w >> 32) != gen || (int64_t)(w & 0xffffffffu) >= chunks_.load(std::memory_order_relaxed)) return;
      if (!word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) continue;
      fn_(ctx_, (int64_t)(w & 0xffffffffu));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      uint64_t gen;
      for (int spins = 0;; ++spins) {
        gen = word_.load(std::memory_order_acquire) >> 32;
        if (gen != seen) break;
        _mm_pause();
        if ((spins & 255) == 255 &&
            std::chrono::steady_clock::now() - idle_since > std::chrono::microseconds(kSpinUs)) {
          std::unique_lock<std::mutex> lock(sleep_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return (word_.load() >> 32) != seen; });
          sleeping_.fetch_sub(1);
          idle_since = std::chrono::steady_clock::now();
        }
      }
      seen = gen;
      Work(gen);
    }
  }

  std::mutex busy_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> word_{0};  // generation << 32 | next chunk
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int64_t> chunks_{0};  // atomic: a late helper may read it while the next job is set
  std::vector<std::thread> threads_;
};

// Helpers the team keeps: XLA's pool size, leaving one core for the calling thread.
inline int64_t TeamSize(xla::ffi::ThreadPool& pool) {
  static const int64_t size = std::min<int64_t>(pool.num_threads(), (int64_t)std::thread::hardware_concurrency() - 1);
  return size;
}

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and helpers (one chunk: the
// calling thread alone): the team's where it is free, else XLA's pool. Chunks are claimed from a
// shared counter, so the caller never waits on a task that has not started: a busy helper only
// means the caller does more itself.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, Body body) {
  if (chunks <= 1) {
    if (chunks == 1) body(0);
    return;
  }
  if (Team* team = Team::Get(TeamSize(pool))) {
    auto call = [](void* ctx, int64_t c) { (*static_cast<Body*>(ctx))(c); };
    if (team->Run(chunks, call, &body)) return;
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

// Units [0, count) of a stream (a weight's panels, each read in address order) shared by the
// threads: each takes one contiguous range and claims its units from the front, one at a time,
// so its reads run on in address order; a thread done with its own range claims units from the
// far end of the others'. Fixed chunks (ParallelFor) left one thread idle while the other
// finished its last chunk, and each chunk began a new stream the prefetchers had to catch up
// with: a chain of cold 768 x 768 float32 products, 8 rows, 21.0 -> 22.5 GB/s; 512 x 512,
// 19.7 -> 22.4.
class StreamClaims {
 public:
  // Claims of the thread that owns range `own` of ranges[0:n].
  StreamClaims(std::atomic<uint64_t>* ranges, int64_t n, int64_t own) : ranges_(ranges), n_(n), own_(own) {}

  // The next unit, and whether it does not follow the last one claimed (its first bytes are not
  // on their way yet). False when every unit is claimed.
  bool Next(int64_t* unit, bool* jumped) {
    for (; range_ < n_; ++range_) {
      std::atomic<uint64_t>& fb = ranges_[(own_ + range_) % n_];
      if (range_ == 0 ? ClaimFront(fb, unit) : ClaimBack(fb, unit)) {
        *jumped = *unit != last_ + 1;
        last_ = *unit;
        return true;
      }
    }
    return false;
  }

 private:
  // A range is one word, front | back << 32, so a front and a back claim never take one unit.
  static bool ClaimFront(std::atomic<uint64_t>& fb, int64_t* unit) {
    uint64_t v = fb.load(std::memory_order_relaxed);
    while ((v & 0xffffffffu) < (v >> 32))
      if (fb.compare_exchange_weak(v, v + 1, std::memory_order_relaxed)) {
        *unit = (int64_t)(v & 0xffffffffu);
        return true;
      }
    return false;
  }
  static bool ClaimBack(std::atomic<uint64_t>& fb, int64_t* unit) {
    uint64_t v = fb.load(std::memory_order_relaxed);
    while ((v & 0xffffffffu) < (v >> 32))
      if (fb.compare_exchange_weak(v, v - (uint64_t{1} << 32), std::memory_order_relaxed)) {
        *unit = (int64_t)(v >> 32) - 1;
        return true;
      }
    return false;
  }

  std::atomic<uint64_t>* ranges_;
  int64_t n_, own_, range_ = 0, last_ = -2;
};

// Runs body(claims) on the calling thread and helpers, one StreamClaims each (see above), until
// every unit of [0, count) is claimed; `parallel` false: the calling thread alone.
template <typename Body>
void ParallelStream(xla::ffi::ThreadPool& pool, int64_t count, Body body, bool parallel = true) {
  constexpr int64_t kMaxRanges = 64;
  const int64_t n = parallel ? std::max<int64_t>(1, std::min({count, TeamSize(pool) + 1, kMaxRanges})) : 1;
  std::atomic<uint64_t> ranges[kMaxRanges];
  for (int64_t r = 0; r < n; ++r)
    ranges[r].store((uint64_t)(count * r / n) | (uint64_t)(count * (r + 1) / n) << 32, std::memory_order_relaxed);
  ParallelFor(pool, n, [&](int64_t r) {
    StreamClaims claims(ranges, n, r);
    body(claims);
  });
}

}  // namespace encdec
