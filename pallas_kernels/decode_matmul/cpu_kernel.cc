// float32 matmul for decode shapes (at most kMaxRows activation rows) on x86 CPUs with AVX-512,
// as an XLA FFI custom call: y[M, N] = x[M, K] . w, w [K, N] (every projection) or [N, K] (a
// tied LM head's embedding table, contracted in place).
//
// Why a kernel: at 8 rows a decode step's products are bound by reading the weights, and
// XLA:CPU's library dots read them at 9-15 GB/s of the ~28 the machine streams (a t5-small
// float32 step at 8 slots: ~14 ms of products against a 5 ms floor).
//
// - KN: each thread takes a contiguous range of weight rows and walks it kBlockRows rows at a
//   time, 32 columns across (kBlockRows streams the L2 prefetcher follows), keeping a tile of
//   up to 8 activation rows x 32 columns in registers; the ranges' partial sums, in memory, are
//   added at the end.
// - NK: each thread takes a range of outputs, 4 weight rows (contiguous) at a time, and reduces
//   16-lane partial sums at the end; the next 4 rows are fetched into L2 as it goes (12 -> 17
//   GB/s on a t5-small head; XLA's dot reads it at 16).
// Float32 throughout (FMA): the sums differ from XLA's only in their order.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using encdec::ParallelFor;

namespace {

constexpr int64_t kMaxRows = 16;      // activation rows the kernel takes (decode)
constexpr int64_t kTileRows = 8;      // rows a KN tile keeps in registers (x 2 vectors)
constexpr int64_t kBlockRows = 16;    // weight rows a KN block walks together
constexpr int64_t kParallelBytes = 1 << 17;  // below, the calling thread does it all
constexpr int64_t kPrefetchMaxCols = 1024;   // rows of at most 4 KB: prefetched (KnRange)

// No lanes for count <= 0: a shift by a negative count is undefined (x86 gave all 16, so a
// tile's second vector read past a row narrower than 16 columns).
inline __mmask16 Lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}

// acc[0:R, 0:32] (+)= x[0:R, k0:k1] . w[k0:k1, n0:n0+32] (columns masked past N).
template <int R>
void KnTile(const float* x, int64_t K, const float* w, int64_t N, int64_t k0, int64_t k1, int64_t n0,
            float* acc, int64_t acc_stride, bool first) {
  const __mmask16 m0 = Lanes(N - n0), m1 = Lanes(N - n0 - 16);
  __m512 a[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = w + k * N + n0;
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, row), w1 = _mm512_maskz_loadu_ps(m1, row + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(x[r * K + k]);
      a[r][0] = _mm512_fmadd_ps(b, w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(b, w1, a[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* t = acc + r * acc_stride;
    if (!first) {
      a[r][0] = _mm512_add_ps(a[r][0], _mm512_loadu_ps(t));
      a[r][1] = _mm512_add_ps(a[r][1], _mm512_loadu_ps(t + 16));
    }
    _mm512_storeu_ps(t, a[r][0]);
    _mm512_storeu_ps(t + 16, a[r][1]);
  }
}

using KnTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                          int64_t, bool);

KnTileFn KnTileFor(int64_t rows) {
  static constexpr KnTileFn fns[] = {KnTile<1>, KnTile<2>, KnTile<3>, KnTile<4>,
                                     KnTile<5>, KnTile<6>, KnTile<7>, KnTile<8>};
  return fns[rows - 1];
}

// Weight rows [k0, k1) into acc[M, Np] (stored by the first block, added by the rest).
void KnRange(const float* x, const float* w, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1,
             float* acc, int64_t Np) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t k = k0; k < k1; k += kBlockRows) {
    const int64_t kend = std::min(k1, k + kBlockRows);
    // Rows of at most a page interleave several streams in one page, which the L2 prefetcher
    // does not follow: the next block is fetched into L2 in address order, a slice per panel
    // (11 -> 15 GB/s at 512 columns; wider rows lose by it).
    const char* next = (const char*)(w + kend * N);
    const int64_t next_bytes = N <= kPrefetchMaxCols ? std::max<int64_t>(0, std::min(k1, kend + kBlockRows) - kend) * N * 4 : 0;
    const int64_t slice = (next_bytes / ((N + 31) / 32) + 63) / 64 * 64;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      for (int64_t b = n0 / 32 * slice; b < std::min(next_bytes, (n0 / 32 + 1) * slice); b += 64)
        _mm_prefetch(next + b, _MM_HINT_T1);
      for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
        const int64_t rows = (M - m0) / (tiles - t);
        KnTileFor(rows)(x + m0 * K, K, w, N, k, kend, n0, acc + m0 * Np + n0, Np, k == k0);
        m0 += rows;
      }
    }
  }
}

// The 16-lane sums of four vectors, as four floats.
inline __m128 Sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// y[m0:m0+R, n0:n0+C] for an NK weight (R, C <= 4).
template <int R, int C>
void NkTile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0,
            const float* next) {
  __m512 a[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 lanes = Lanes(K - k);
    __m512 wv[4];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_ps(lanes, w + (n0 + c) * K + k);
    if (next)  // the next group's rows, line for line (four streams in a few pages: see KnRange)
      for (int c = 0; c < 4; ++c) _mm_prefetch((const char*)(next + c * K + k), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + (m0 + r) * K + k);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, Sum4(a[r][0], a[r][1], a[r][2], a[r][3]));
    for (int c = 0; c < C; ++c) y[(m0 + r) * N + n0 + c] = sums[c];
  }
}

template <int C>
void NkColumns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  const float* next = n0 + 8 <= N ? w + (n0 + 4) * K : nullptr;  // only the first pass fetches
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4, next = nullptr) NkTile<4, C>(x, w, y, K, N, m0, n0, next);
  switch (M - m0) {
    case 1: NkTile<1, C>(x, w, y, K, N, m0, n0, next); break;
    case 2: NkTile<2, C>(x, w, y, K, N, m0, n0, next); break;
    case 3: NkTile<3, C>(x, w, y, K, N, m0, n0, next); break;
  }
}

ffi::Error DecodeMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y, int64_t nk_layout) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2)
    return ffi::Error::InvalidArgument("decode matmul: x and w must be matrices");
  const int64_t M = x_dims[0], K = x_dims[1];
  const int64_t N = nk_layout ? w_dims[0] : w_dims[1];
  if ((nk_layout ? w_dims[1] : w_dims[0]) != K)
    return ffi::Error::InvalidArgument("decode matmul: x and w disagree on K");
  if (M > kMaxRows) return ffi::Error::InvalidArgument("decode matmul: more than 16 rows");
  float* out = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const bool parallel = K * N * 4 >= kParallelBytes;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (nk_layout) {
    const int64_t groups = (N + 3) / 4;
    const int64_t chunks = parallel ? std::min<int64_t>(groups, 4 * (threads + 1)) : 1;
    ParallelFor(pool, chunks, [&](int64_t c) {
      const int64_t n1 = std::min(N, groups * (c + 1) / chunks * 4);
      int64_t n = groups * c / chunks * 4;
      for (; n + 4 <= n1; n += 4) NkColumns<4>(xd, wd, out, M, K, N, n);
      for (; n < n1; ++n) NkColumns<1>(xd, wd, out, M, K, N, n);
    });
    return ffi::Error::Success();
  }
  const int64_t Np = (N + 31) / 32 * 32;
  const int64_t blocks = (K + kBlockRows - 1) / kBlockRows;
  const int64_t ranges = parallel ? std::min(threads, blocks) : 1;
  if (ranges == 1 && Np == N) {  // straight into y; else through a padded buffer
    KnRange(xd, wd, M, K, N, 0, K, out, N);
    return ffi::Error::Success();
  }
  thread_local std::vector<float> acc;
  acc.resize(ranges * M * Np);
  float* sums = acc.data();
  ParallelFor(pool, ranges, [&](int64_t r) {
    const int64_t k0 = blocks * r / ranges * kBlockRows;
    const int64_t k1 = std::min(K, blocks * (r + 1) / ranges * kBlockRows);
    KnRange(xd, wd, M, K, N, k0, k1, sums + r * M * Np, Np);
  });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 lanes = Lanes(N - n);
      __m512 s = _mm512_loadu_ps(sums + m * Np + n);
      for (int64_t r = 1; r < ranges; ++r) s = _mm512_add_ps(s, _mm512_loadu_ps(sums + r * M * Np + m * Np + n));
      _mm512_mask_storeu_ps(out + m * N + n, lanes, s);
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EncdecDecodeMatmul, DecodeMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("nk_layout"));
