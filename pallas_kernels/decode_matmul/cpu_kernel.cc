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
// - NK: each thread takes a range of outputs, 2 weight rows (contiguous) at a time against up to 8
//   activation rows, and reduces 16-lane partial sums at the end; the rows 2 groups on are
//   fetched into L2 as it goes (15-16 -> 18-21 GB/s on the t5-small and bart-base heads; XLA's dot reads it at 16).
// - panels ([N / 32, K, 32], a KN weight packed once by an engine: pack_panels): each thread takes
//   a range of 32-column panels and streams them in address order, fetching 8 KB ahead into L2,
//   with the panel's sums in registers for all of K, then takes panels from the far end of the
//   others' (ParallelStream). The loads otherwise stalled the products: a 512 x 512 weight read
//   at 13 GB/s in place, at ~21 packed (the machine streams ~27).
// A bias ([N], or empty) is added as the sums are stored: on a BART head, an add of XLA's after
// the product cost ~0.4 ms a step (8 x 50265 sums written, read and written again).
// Float32 throughout (FMA): the sums differ from XLA's only in their order.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using encdec::ParallelFor;
using encdec::ParallelStream;

namespace {

constexpr int64_t kMaxRows = 16;      // activation rows the kernel takes (decode)
constexpr int64_t kTileRows = 8;      // rows a KN tile keeps in registers (x 2 vectors)
constexpr int64_t kBlockRows = 16;    // weight rows a KN block walks together
constexpr int64_t kParallelBytes = 1 << 17;  // below, the calling thread does it all
constexpr int64_t kPrefetchMaxCols = 1024;   // rows of at most 4 KB: prefetched (KnRange)
constexpr int64_t kNkCols = 2;     // weight rows (outputs) an NK tile reads together
constexpr int64_t kNkAhead = 2;    // NK groups fetched ahead
constexpr int64_t kPanelCols = 32;       // columns of a packed panel
constexpr int64_t kPanelAhead = 8192;    // bytes of a panel stream fetched ahead into L2
constexpr int64_t kLayoutNk = 1, kLayoutPanels = 2;  // the w_layout attribute (0: KN)

// No lanes for count <= 0: a shift by a negative count is undefined (x86 gave all 16, so a
// tile's second vector read past a row narrower than 16 columns).
inline __mmask16 Lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}

// Where a tile's weight columns come from and its sums go: the KN path's 32 columns of rows
// [k0, k1) in place (loads masked past N, sums added to a padded buffer), or a packed panel's
// (every column loaded, stores masked past N, the stream fetched ahead).
struct TileIo {
  const float* w;      // weight row 0's first column of the 32
  int64_t w_stride;    // floats from one weight row to the next
  __mmask16 load[2];   // the columns loaded (a vector each)
  float* out;          // sums row 0
  int64_t out_stride;  // floats from one sums row to the next
  __mmask16 store[2];  // the columns stored
  bool add;            // add the tile to what `out` holds
  const float* bias;   // the 32 columns' bias, added as they are stored (or null)
};

// out[0:R, 0:32] (+)= x[0:R, k0:k1] . w[k0:k1, 0:32], x's rows K apart: 8 rows x 2 vectors of
// sums in registers, each weight row loaded once and broadcast-multiplied by every x row.
// `Fetch`: fetch kPanelAhead bytes on into L2 as the rows stream (a packed panel's first tile; a
// compile-time choice: tested in the loop, it cost the panels 4-7%).
template <int R, bool Fetch>
void Tile(const float* x, int64_t K, int64_t k0, int64_t k1, const TileIo& io) {
  __m512 a[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = io.w + k * io.w_stride;
    if (Fetch) {  // past the weight's end a prefetch is dropped, never a fault
      _mm_prefetch((const char*)row + kPanelAhead, _MM_HINT_T1);
      _mm_prefetch((const char*)row + kPanelAhead + 64, _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_maskz_loadu_ps(io.load[0], row), w1 = _mm512_maskz_loadu_ps(io.load[1], row + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(x[r * K + k]);
      a[r][0] = _mm512_fmadd_ps(b, w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(b, w1, a[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* t = io.out + r * io.out_stride;
    if (io.add) {
      a[r][0] = _mm512_add_ps(a[r][0], _mm512_maskz_loadu_ps(io.store[0], t));
      a[r][1] = _mm512_add_ps(a[r][1], _mm512_maskz_loadu_ps(io.store[1], t + 16));
    }
    if (io.bias) {
      a[r][0] = _mm512_add_ps(a[r][0], _mm512_maskz_loadu_ps(io.store[0], io.bias));
      a[r][1] = _mm512_add_ps(a[r][1], _mm512_maskz_loadu_ps(io.store[1], io.bias + 16));
    }
    _mm512_mask_storeu_ps(t, io.store[0], a[r][0]);
    _mm512_mask_storeu_ps(t + 16, io.store[1], a[r][1]);
  }
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const TileIo&);

TileFn TileFor(int64_t rows, bool fetch) {
  static constexpr TileFn fns[2][8] = {
      {Tile<1, false>, Tile<2, false>, Tile<3, false>, Tile<4, false>, Tile<5, false>, Tile<6, false>,
       Tile<7, false>, Tile<8, false>},
      {Tile<1, true>, Tile<2, true>, Tile<3, true>, Tile<4, true>, Tile<5, true>, Tile<6, true>, Tile<7, true>,
       Tile<8, true>}};
  return fns[fetch][rows - 1];
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
      TileIo io{w + n0, N, {Lanes(N - n0), Lanes(N - n0 - 16)}, nullptr, Np, {0xFFFF, 0xFFFF}, k != k0, nullptr};
      for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
        const int64_t rows = (M - m0) / (tiles - t);
        io.out = acc + m0 * Np + n0;
        TileFor(rows, false)(x + m0 * K, K, k, kend, io);
        m0 += rows;
      }
    }
  }
}

// y[m0:m0+R, n0:n0+C] for an NK weight (R <= 8, C <= 2): every row of the tile in one pass over
// the C weight rows, so each weight line is loaded once; 16-lane partial sums reduced at the end.
// `ahead`: where to fetch into L2, line for line, the weight rows kNkAhead groups on (null: none).
template <int R, int C>
void NkTile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0,
            const float* ahead) {
  __m512 a[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 lanes = Lanes(K - k);
    __m512 wv[C];
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) {
      wv[c] = _mm512_maskz_loadu_ps(lanes, w + (n0 + c) * K + k);
      if (ahead) _mm_prefetch((const char*)(ahead + c * K + k), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + (m0 + r) * K + k);
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[(m0 + r) * N + n0 + c] = _mm512_reduce_add_ps(a[r][c]);
}

using NkTileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, const float*);

template <int C>
NkTileFn NkTileFor(int64_t rows) {
  static constexpr NkTileFn fns[] = {NkTile<1, C>, NkTile<2, C>, NkTile<3, C>, NkTile<4, C>,
                                     NkTile<5, C>, NkTile<6, C>, NkTile<7, C>, NkTile<8, C>};
  return fns[rows - 1];
}

// Outputs [n0, n1) of an NK weight, kNkCols at a time, every row tile (of at most kTileRows) in
// turn. The first tile fetches ahead: the weight streams in address order, but each line also
// costs R x C products, and the hardware prefetcher alone let the loads stall them (a t5-small
// head: 17 GB/s; fetched into L2 two groups ahead: 19-21).
void NkRange(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  int64_t n = n0;
  for (; n < n1; n += kNkCols) {
    const int64_t cols = std::min(kNkCols, n1 - n);
    const float* ahead = n + (kNkAhead + 1) * kNkCols <= N ? w + (n + kNkAhead * kNkCols) * K : nullptr;
    for (int64_t t = 0, m0 = 0; t < tiles; ++t, ahead = nullptr) {
      const int64_t rows = (M - m0) / (tiles - t);
      (cols == kNkCols ? NkTileFor<kNkCols>(rows) : NkTileFor<1>(rows))(x, w, y, K, N, m0, n, ahead);
      m0 += rows;
    }
  }
}

// Panel p of a packed weight into y[M, N], every row tile (of at most kTileRows) in turn; the
// first fetches kPanelAhead bytes on as it streams. `jumped`: the panel does not follow the one
// this thread did last, so its first kPanelAhead bytes are fetched first, all at once (a chain of
// cold products lost ~3% to each claim's first bytes read as they were needed).
void Panel(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N, int64_t p,
           bool jumped) {
  const float* panel = w + p * K * kPanelCols;
  if (jumped)
    for (int64_t b = 0; b < std::min<int64_t>(kPanelAhead, K * kPanelCols * 4); b += 64)
      _mm_prefetch((const char*)panel + b, _MM_HINT_T1);
  const int64_t tiles = (M + kTileRows - 1) / kTileRows, n0 = p * kPanelCols;
  TileIo io{panel, kPanelCols, {0xFFFF, 0xFFFF}, nullptr, N, {Lanes(N - n0), Lanes(N - n0 - 16)}, false,
            bias ? bias + n0 : nullptr};
  for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
    const int64_t rows = (M - m0) / (tiles - t);
    io.out = y + m0 * N + n0;
    TileFor(rows, t == 0)(x + m0 * K, K, 0, K, io);
    m0 += rows;
  }
}

// y[m, :] += bias for the layouts whose tiles do not add it (their sums are stored in parts).
void AddBias(const float* bias, float* y, int64_t M, int64_t N) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 lanes = Lanes(N - n);
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, y + m * N + n), _mm512_maskz_loadu_ps(lanes, bias + n));
      _mm512_mask_storeu_ps(y + m * N + n, lanes, sum);
    }
}

ffi::Error DecodeMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t w_layout) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions(), y_dims = y->dimensions();
  const bool nk_layout = w_layout == kLayoutNk, panels = w_layout == kLayoutPanels;
  if (x_dims.size() != 2 || w_dims.size() != (panels ? 3u : 2u) || y_dims.size() != 2)
    return ffi::Error::InvalidArgument("decode matmul: x and w must be matrices (w: [N / 32, K, 32] panels)");
  const int64_t M = x_dims[0], K = x_dims[1];
  const int64_t N = panels ? y_dims[1] : nk_layout ? w_dims[0] : w_dims[1];
  const bool panels_fit = panels && w_dims[0] == (N + kPanelCols - 1) / kPanelCols && w_dims[2] == kPanelCols;
  if ((panels ? !panels_fit || w_dims[1] != K : (nk_layout ? w_dims[1] : w_dims[0]) != K) || y_dims[0] != M)
    return ffi::Error::InvalidArgument("decode matmul: x, w and y disagree on K or N");
  if (M > kMaxRows) return ffi::Error::InvalidArgument("decode matmul: more than 16 rows");
  if (b.element_count() != 0 && (int64_t)b.element_count() != N)
    return ffi::Error::InvalidArgument("decode matmul: the bias must be [N] (or empty)");
  const float* bias = b.element_count() ? b.typed_data() : nullptr;
  float* out = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    if (bias) AddBias(bias, out, M, N);
    return ffi::Error::Success();
  }
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const bool parallel = K * N * 4 >= kParallelBytes;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (panels) {
    ParallelStream(
        pool, (N + kPanelCols - 1) / kPanelCols,
        [&](encdec::StreamClaims& claims) {
          bool jumped;
          for (int64_t p; claims.Next(&p, &jumped);) Panel(xd, wd, bias, out, M, K, N, p, jumped);
        },
        parallel);
    return ffi::Error::Success();
  }
  if (nk_layout) {
    const int64_t groups = (N + kNkCols - 1) / kNkCols;
    const int64_t chunks = parallel ? std::min<int64_t>(groups, 4 * (threads + 1)) : 1;
    ParallelFor(pool, chunks, [&](int64_t c) {
      NkRange(xd, wd, out, M, K, N, groups * c / chunks * kNkCols, std::min(N, groups * (c + 1) / chunks * kNkCols));
    });
    if (bias) AddBias(bias, out, M, N);
    return ffi::Error::Success();
  }
  const int64_t Np = (N + 31) / 32 * 32;
  const int64_t blocks = (K + kBlockRows - 1) / kBlockRows;
  const int64_t ranges = parallel ? std::min(threads, blocks) : 1;
  if (ranges == 1 && Np == N) {  // straight into y; else through a padded buffer
    KnRange(xd, wd, M, K, N, 0, K, out, N);
    if (bias) AddBias(bias, out, M, N);
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
      if (bias) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(lanes, bias + n));
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias: [N], or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("w_layout"));
