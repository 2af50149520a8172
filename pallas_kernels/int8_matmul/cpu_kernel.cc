// int8 x int8 -> int32 matmul for decode shapes on x86 CPUs with AVX-512 VNNI, as an XLA FFI
// custom call. The same arithmetic as reference.py: activations quantized per row (symmetric,
// absmax * (1 / 127), round half to even), an exact int32 dot against int8 weights, then
// acc * row scale * column scale in float32, plus a bias per column where one is given.
//
// Why a kernel: XLA:CPU's int8 dot is compute-bound at decode shapes (4-10 GB/s of weights),
// while a decode step is memory-bound; VPDPBUSD multiplies 64 byte pairs per instruction.
//
// VPDPBUSD takes unsigned x signed bytes. The weights are the unsigned side (w + 128, one XOR
// per loaded vector), the quantized activations the signed side, and the excess
// 128 * sum_k q[m, k] is subtracted per row: exact, since every sum fits int32 (K * 127 * 255).
//
// Three weight layouts. Two are the models' own, read in place:
// - KN ([K, N], every projection): four rows of 64 columns are loaded and interleaved into
//   four vectors of 16 columns x 4 consecutive k, the layout VPDPBUSD reduces over; each
//   activation row broadcasts its 4 bytes of k. Columns come out permuted within 128-bit lanes
//   and are put back when stored.
// - NK ([N, K], a tied LM head's embedding table): each output is a dot product along
//   contiguous k; 16-lane partial sums are reduced at the end.
// Decode rows (M <= 16) of a KN weight stream it in address order, split over row ranges, and
// multiply with AMX tiles where the CPU has them (KnDecode); more rows (the encoder) are split
// over column panels.
// - tiles ([N / 64, K / 64, 4096]): a KN weight packed once, at load, in the order the products
//   read it (TilesMatmul): what an engine holds on CPU, the fastest at every row count.
// Work is shared with XLA's intra-op thread pool.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using encdec::ParallelFor;
using encdec::ParallelStream;

namespace {

constexpr int64_t kMaxRows = 4;        // activation rows a KN tile keeps in registers (x4 vectors)
constexpr int64_t kNkRows = 4;         // activation rows of an NK tile (<= 4)
constexpr int64_t kNkCols = 4;         // weight rows (outputs) of an NK tile (<= 4)
constexpr int64_t kParallelBytes = 1 << 19;  // below both, the calling thread does it all
constexpr int64_t kParallelMacs = 1 << 22;
constexpr int64_t kParallelQuantize = 1 << 17;  // activations quantized by several threads
constexpr int64_t kLayoutNk = 1, kLayoutTiles = 2;  // the w_layout attribute (0: KN)

struct Quantized {
  std::vector<int8_t> q;        // [M, Kp], zero past K
  std::vector<float> scale;     // [M]
  std::vector<int32_t> excess;  // [M]: 128 * sum_k q
  int64_t Kp;
};

// The calling thread's buffers, sized for M rows of K (a decode step's calls reuse them: fresh
// vectors cost ~1 us a call). Codes past K are zeros: the tiles read whole blocks of 64.
Quantized& Allocate(int64_t M, int64_t K) {
  thread_local Quantized out;
  out.Kp = (K + 63) / 64 * 64;
  out.q.resize(M * out.Kp);
  if (out.Kp != K)
    for (int64_t m = 0; m < M; ++m) std::fill(out.q.begin() + m * out.Kp + K, out.q.begin() + (m + 1) * out.Kp, 0);
  out.scale.resize(M);
  out.excess.resize(M);
  return out;
}

// Symmetric per-row quantization of row m, as reference.quantize_rows: s = max|x| * (1 / 127)
// (1 for a zero row), q = clip(round(x * (1 / s)), -127, 127). Products by reciprocals, as XLA
// computes the reference: a code at a rounding tie must round alike.
void QuantizeRow(const float* x, int64_t K, int64_t m, Quantized& out) {
  const float* row = x + m * K;
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 mask = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + k)));
  }
  const float a = _mm512_reduce_max_ps(amax);
  const float s = a > 0.0f ? a * (1.0f / 127.0f) : 1.0f;
  const __m512 inv_s = _mm512_set1_ps(1.0f / s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512i sum = _mm512_setzero_si512();
  int8_t* q = out.q.data() + m * out.Kp;
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 mask = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + k), inv_s));
    r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
    sum = _mm512_add_epi32(sum, _mm512_maskz_mov_epi32(mask, r));
    _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtepi32_epi8(r));
  }
  out.scale[m] = s;
  out.excess[m] = 128 * _mm512_reduce_add_epi32(sum);
}

inline __mmask64 ColumnMask(int64_t left) {
  return left >= 64 ? ~__mmask64{0} : ((__mmask64{1} << left) - 1);
}

// Four weight rows (k..k+3, 64 columns from n0) as VPDPBUSD's unsigned operand: v[i] lane 4L+j
// holds w[k..k+3, n0 + 16L + 4i + j] + 128. Rows at or past K (rows < 4) read as weight 0.
inline void KnInterleave(const int8_t* w, int64_t N, __mmask64 mask, int rows, __m512i v[4],
                         bool unsigned_side = true) {
  const __m512i flip = _mm512_set1_epi8(unsigned_side ? (char)0x80 : 0);
  __m512i r[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    r[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(i < rows ? mask : 0, w + i * N), flip);
  const __m512i t0 = _mm512_unpacklo_epi8(r[0], r[1]), t1 = _mm512_unpackhi_epi8(r[0], r[1]);
  const __m512i t2 = _mm512_unpacklo_epi8(r[2], r[3]), t3 = _mm512_unpackhi_epi8(r[2], r[3]);
  v[0] = _mm512_unpacklo_epi16(t0, t2);
  v[1] = _mm512_unpackhi_epi16(t0, t2);
  v[2] = _mm512_unpacklo_epi16(t1, t3);
  v[3] = _mm512_unpackhi_epi16(t1, t3);
}

// What a store applies per output column: the weight's scale, then the bias where there is one
// (a projection's, BART's logits bias): one pass over y fewer than an add after the call.
struct Columns {
  const float* scale;
  const float* bias;  // or null
  Columns at(int64_t n0) const { return {scale + n0, bias ? bias + n0 : nullptr}; }
};

// One row of a 64-column panel's int32 sums in KnInterleave's lane order (a[i] lane L holds
// columns 16L + 4i .. +3) to float32 at dst: a 4 x 4 transpose of 128-bit lanes puts columns
// 16q .. 16q + 15 in out[q]; then (sum - excess) * row scale * column scale, rounded, + bias.
inline void StorePanelRow(const __m512i a[4], int32_t excess, float row_scale, Columns w, float* dst,
                          int64_t cols) {
  const __m512i t0 = _mm512_shuffle_i32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_i32x4(a[2], a[3], 0x44);
  const __m512i t2 = _mm512_shuffle_i32x4(a[0], a[1], 0xEE), t3 = _mm512_shuffle_i32x4(a[2], a[3], 0xEE);
  const __m512i out[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xDD),
                          _mm512_shuffle_i32x4(t2, t3, 0x88), _mm512_shuffle_i32x4(t2, t3, 0xDD)};
  const __m512i ex = _mm512_set1_epi32(excess);
  const __m512 xs = _mm512_set1_ps(row_scale);
  for (int q = 0; q < 4 && 16 * q < cols; ++q) {
    const int64_t left = cols - 16 * q;
    const __mmask16 mask = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, w.scale + 16 * q);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(out[q], ex)), xs), ws);
    if (w.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, w.bias + 16 * q));
    _mm512_mask_storeu_ps(dst + 16 * q, mask, v);
  }
}

// An activation row's 4 bytes of k (unaligned), in every 32-bit lane: VPDPBUSD's signed side.
inline __m512i Broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Accumulators are named variables, not arrays: GCC keeps arrays of vectors updated by
// VPDPBUSD on the stack, which halved the kernel's speed.
#define ENCDEC_ZERO4(r) __m512i a##r##0 = _mm512_setzero_si512(), a##r##1 = a##r##0, a##r##2 = a##r##0, a##r##3 = a##r##0;
#define ENCDEC_KN_ROW(r)                                                              \
  if constexpr (R > r) {                                                              \
    const __m512i b = Broadcast4(q + r * q_stride + k);                               \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, v[0], b);                                  \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, v[1], b);                                  \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, v[2], b);                                  \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, v[3], b);                                  \
  }
#define ENCDEC_STORE4(r) \
  if constexpr (R > r) { __m512i* t = acc[r]; t[0] = a##r##0; t[1] = a##r##1; t[2] = a##r##2; t[3] = a##r##3; }

// y[m0:m0+R, n0:n0+64] for a KN weight (R <= 4), interleaving as it goes, or reading the panel
// interleaved once into `packed` (many row tiles: the encoder).
template <int R>
void KnTile(const Quantized& xq, const int8_t* w, Columns w_scale, float* y, int64_t K,
            int64_t N, int64_t m0, int64_t n0, bool prefetch, const __m512i* packed) {
  const __mmask64 mask = ColumnMask(N - n0);
  const int8_t* q = xq.q.data() + m0 * xq.Kp;
  const int64_t q_stride = xq.Kp;
  ENCDEC_ZERO4(0) ENCDEC_ZERO4(1) ENCDEC_ZERO4(2) ENCDEC_ZERO4(3)
  __m512i v[4];
  for (int64_t k = 0; k < K; k += 4) {
    if (packed) {
      for (int i = 0; i < 4; ++i) v[i] = _mm512_load_si512(packed + k + i);
    } else {
      if (prefetch)  // 16 rows ahead in the panel: rows N bytes apart are no stream to detect
        for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(w + (k + 16 + i) * N + n0), _MM_HINT_T0);
      KnInterleave(w + k * N + n0, N, mask, K - k >= 4 ? 4 : (int)(K - k), v);
    }
    ENCDEC_KN_ROW(0) ENCDEC_KN_ROW(1) ENCDEC_KN_ROW(2) ENCDEC_KN_ROW(3)
  }
  __m512i acc[4][4];
  ENCDEC_STORE4(0) ENCDEC_STORE4(1) ENCDEC_STORE4(2) ENCDEC_STORE4(3)
  const int64_t cols = std::min<int64_t>(64, N - n0);
  for (int r = 0; r < R; ++r)
    StorePanelRow(acc[r], xq.excess[m0 + r], xq.scale[m0 + r], w_scale.at(n0), y + (m0 + r) * N + n0, cols);
}

void KnPanel(const Quantized& xq, const int8_t* w, Columns s, float* y, int64_t M, int64_t K,
             int64_t N, int64_t n0) {
  // Even row tiles of at most kMaxRows: 7 rows run as 3 + 4, not 4 + 3 + ... .
  const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
  std::vector<__m512i> panel;
  const __m512i* packed = nullptr;
  if (tiles > 2) {  // interleave once, not once per tile
    panel.resize((K + 3) / 4 * 4);
    for (int64_t k = 0; k < K; k += 4)
      KnInterleave(w + k * N + n0, N, ColumnMask(N - n0), K - k >= 4 ? 4 : (int)(K - k), panel.data() + k);
    packed = panel.data();
  }
  for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
    const int64_t rows = (M - m0) / (tiles - t);
    switch (rows) {
      case 1: KnTile<1>(xq, w, s, y, K, N, m0, n0, t == 0, packed); break;
      case 2: KnTile<2>(xq, w, s, y, K, N, m0, n0, t == 0, packed); break;
      case 3: KnTile<3>(xq, w, s, y, K, N, m0, n0, t == 0, packed); break;
      default: KnTile<4>(xq, w, s, y, K, N, m0, n0, t == 0, packed); break;
    }
    m0 += rows;
  }
}

// Decode rows (M <= kStreamRows) read a KN weight as a stream: each thread takes a contiguous
// range of rows, kBlockRows at a time. A block is first read in address order and interleaved
// into an L2 buffer (the order the L2 streamer follows: 64-column panels read down the rows
// reached 6-8 GB/s of the 28 the machine reads), then multiplied panel by panel into int32
// partial sums in memory; the ranges' sums are added when the result is stored.
constexpr int64_t kStreamRows = 16;
constexpr int64_t kBlockRows = 64;     // 16 groups of 4 rows: one AMX tile of weights
constexpr int64_t kChunkCols = 4096;   // columns a packed block holds (256 KB)
constexpr int64_t kStreamParallelBytes = 1 << 16;

// Rows [k, k + 64) x columns [c0, c1) (c0 a multiple of 64) in address order, interleaved into pk:
// per panel of 64 columns, [column group i][row group g] vectors (an AMX tile per i). Row groups
// at or past K are zeros.
void PackBlock(const int8_t* w, int64_t K, int64_t N, int64_t k, int64_t c0, int64_t c1, __m512i* pk,
               bool unsigned_side) {
  for (int g = 0; g < 16; ++g) {
    const int64_t kk = k + 4 * g;
    for (int64_t n0 = c0; n0 < c1; n0 += 64) {
      __m512i* dst = pk + (n0 - c0) + g;  // (n0 - c0) / 64 panels of 64 vectors
      __m512i v[4] = {};
      if (kk < K) KnInterleave(w + kk * N + n0, N, ColumnMask(N - n0), K - kk >= 4 ? 4 : (int)(K - kk), v, unsigned_side);
      dst[0] = v[0], dst[16] = v[1], dst[32] = v[2], dst[48] = v[3];
    }
  }
}

#define ENCDEC_BLOCK_ROW(r)                                                           \
  if constexpr (R > r) {                                                              \
    const __m512i b = Broadcast4(q + r * q_stride + 4 * g);                           \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, blk[g], b);                                \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, blk[16 + g], b);                           \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, blk[32 + g], b);                           \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, blk[48 + g], b);                           \
  }
#define ENCDEC_ACC_ROW(r)                                                                          \
  if constexpr (R > r) {                                                                           \
    __m512i* t = (__m512i*)(acc + r * acc_stride);                                                 \
    if (first) {                                                                                   \
      _mm512_store_si512(t, a##r##0); _mm512_store_si512(t + 1, a##r##1);                          \
      _mm512_store_si512(t + 2, a##r##2); _mm512_store_si512(t + 3, a##r##3);                      \
    } else {                                                                                       \
      _mm512_store_si512(t, _mm512_add_epi32(_mm512_load_si512(t), a##r##0));                      \
      _mm512_store_si512(t + 1, _mm512_add_epi32(_mm512_load_si512(t + 1), a##r##1));              \
      _mm512_store_si512(t + 2, _mm512_add_epi32(_mm512_load_si512(t + 2), a##r##2));              \
      _mm512_store_si512(t + 3, _mm512_add_epi32(_mm512_load_si512(t + 3), a##r##3));              \
    }                                                                                              \
  }

// acc[m0:m0+R, panel] (+)= q[m0:m0+R, k:k+4*groups] . blk (one packed panel), with VPDPBUSD.
template <int R>
void BlockTile(const int8_t* q, int64_t q_stride, const __m512i* blk, int groups, int32_t* acc,
               int64_t acc_stride, bool first) {
  ENCDEC_ZERO4(0) ENCDEC_ZERO4(1) ENCDEC_ZERO4(2) ENCDEC_ZERO4(3)
  for (int g = 0; g < groups; ++g) {
    ENCDEC_BLOCK_ROW(0) ENCDEC_BLOCK_ROW(1) ENCDEC_BLOCK_ROW(2) ENCDEC_BLOCK_ROW(3)
  }
  ENCDEC_ACC_ROW(0) ENCDEC_ACC_ROW(1) ENCDEC_ACC_ROW(2) ENCDEC_ACC_ROW(3)
}

void PanelsVnni(const Quantized& xq, const __m512i* pk, int64_t M, int64_t k, int groups, int64_t panels,
                int32_t* acc, int64_t Np, bool first) {
  const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
      const int64_t r = (M - m0) / (tiles - t);
      const int8_t* q = xq.q.data() + m0 * xq.Kp + k;
      int32_t* a = acc + m0 * Np + 64 * p;
      const __m512i* blk = pk + 64 * p;
      switch (r) {
        case 1: BlockTile<1>(q, xq.Kp, blk, groups, a, Np, first); break;
        case 2: BlockTile<2>(q, xq.Kp, blk, groups, a, Np, first); break;
        case 3: BlockTile<3>(q, xq.Kp, blk, groups, a, Np, first); break;
        default: BlockTile<4>(q, xq.Kp, blk, groups, a, Np, first); break;
      }
      m0 += r;
    }
  }
}

// AMX (Sapphire Rapids and later): TDPBSSD multiplies an [M, 64] int8 tile by a [64, 16] one in
// VNNI layout, M x 16 x 64 products per instruction where VPDPBUSD does 64: at 8 rows VPDPBUSD
// needs 8 instructions per 64 weight bytes, and the stream was bound by them. Signed x signed:
// no +128 and no excess. Tiles: 0 the activations, 1-4 a panel's four groups of 16 columns, 5
// the weights.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool AmxUsable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    const char* off = std::getenv("ENCDEC_INT8_AMX");  // "0": VPDPBUSD only (tests both paths)
    if (off != nullptr && std::string(off) == "0") return false;
    // Linux (5.16+) lends the tile state to a process that asks; XLA's threads share it.
    return tile && int8 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return usable;
}

__attribute__((target("amx-tile,amx-int8"))) void AmxBegin(int64_t M) {
  TileConfig cfg;
  for (int t = 0; t <= 4; ++t) cfg.rows[t] = (uint8_t)M, cfg.colsb[t] = 64;
  cfg.rows[5] = 16, cfg.colsb[5] = 64;
  // GCC 12 drops the stores above as dead (it does not see LDTILECFG read them): a barrier.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-int8"))) void AmxEnd() { _tile_release(); }

#define ENCDEC_AMX_GROUP(i, tile)          \
  _tile_loadd(5, blk + 16 * (i), 64);      \
  _tile_dpbssd(tile, 0, 5);

__attribute__((target("amx-tile,amx-int8")))
void PanelsAmx(const Quantized& xq, const __m512i* pk, int64_t k, int64_t panels, int32_t* acc, int64_t Np,
               bool first) {
  _tile_loadd(0, xq.q.data() + k, xq.Kp);  // q is zero past K (Kp is a multiple of 64)
  const int64_t stride = Np * sizeof(int32_t);
  for (int64_t p = 0; p < panels; ++p) {
    const __m512i* blk = pk + 64 * p;
    int32_t* a = acc + 64 * p;
    if (first) {
      _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4);
    } else {
      _tile_loadd(1, a, stride); _tile_loadd(2, a + 16, stride);
      _tile_loadd(3, a + 32, stride); _tile_loadd(4, a + 48, stride);
    }
    ENCDEC_AMX_GROUP(0, 1) ENCDEC_AMX_GROUP(1, 2) ENCDEC_AMX_GROUP(2, 3) ENCDEC_AMX_GROUP(3, 4)
    _tile_stored(1, a, stride); _tile_stored(2, a + 16, stride);
    _tile_stored(3, a + 32, stride); _tile_stored(4, a + 48, stride);
  }
}

// Weight rows [k0, k1) (k0 a multiple of kBlockRows) into acc[M, Np]: int32, each panel's 64
// columns in KnInterleave's lane order; stored by the first block, added by the rest.
void KnStream(const Quantized& xq, const int8_t* w, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1,
              int32_t* acc, int64_t Np, bool amx) {
  thread_local std::vector<__m512i> scratch;
  scratch.resize(std::min(Np, kChunkCols) * kBlockRows / 64);
  __m512i* pk = scratch.data();
  if (amx) AmxBegin(M);
  for (int64_t k = k0; k < k1; k += kBlockRows) {
    const int groups = (int)((std::min(kBlockRows, K - k) + 3) / 4);
    for (int64_t c0 = 0; c0 < N; c0 += kChunkCols) {
      const int64_t c1 = std::min(N, c0 + kChunkCols), panels = (c1 - c0 + 63) / 64;
      PackBlock(w, K, N, k, c0, c1, pk, !amx);
      if (amx) {
        PanelsAmx(xq, pk, k, panels, acc + c0, Np, k == k0);
      } else {
        PanelsVnni(xq, pk, M, k, groups, panels, acc + c0, Np, k == k0);
      }
    }
  }
  if (amx) AmxEnd();
}

// y[:, panels p0..p1) from the ranges' partial sums: added, lanes put back in column order,
// the excess (VPDPBUSD's) subtracted and both scales applied.
void KnStreamStore(const int32_t* acc, int64_t ranges, const Quantized& xq, bool excess_in, Columns w_scale,
                   float* y, int64_t M, int64_t N, int64_t Np, int64_t p0, int64_t p1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = 64 * p, cols = std::min<int64_t>(64, N - n0);
      __m512i a[4];
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm512_load_si512(acc + m * Np + n0 + 16 * i);
        for (int64_t r = 1; r < ranges; ++r)
          a[i] = _mm512_add_epi32(a[i], _mm512_load_si512(acc + r * M * Np + m * Np + n0 + 16 * i));
      }
      StorePanelRow(a, excess_in ? xq.excess[m] : 0, xq.scale[m], w_scale.at(n0), y + m * N + n0, cols);
    }
  }
}

void KnDecode(ffi::ThreadPool& pool, const Quantized& xq, const int8_t* w, Columns s, float* y,
              int64_t M, int64_t K, int64_t N, int64_t threads) {
  const bool amx = AmxUsable();
  const int64_t Np = (N + 63) / 64 * 64, panels = Np / 64;
  const int64_t blocks = (K + kBlockRows - 1) / kBlockRows;
  const int64_t ranges = K * N >= kStreamParallelBytes ? std::min(threads, blocks) : 1;
  thread_local std::vector<__m512i> acc;  // aligned (C++17 aligned new)
  acc.resize(ranges * M * Np / 16);
  int32_t* sums = (int32_t*)acc.data();
  ParallelFor(pool, ranges, [&](int64_t r) {
    const int64_t k0 = blocks * r / ranges * kBlockRows;
    const int64_t k1 = std::min(K, blocks * (r + 1) / ranges * kBlockRows);
    KnStream(xq, w, M, K, N, k0, k1, sums + r * M * Np, Np, amx);
  });
  const int64_t chunks = M * Np >= (1 << 15) ? std::min(panels, 4 * threads) : 1;
  ParallelFor(pool, chunks, [&](int64_t c) {
    KnStreamStore(sums, ranges, xq, !amx, s, y, M, N, Np, panels * c / chunks, panels * (c + 1) / chunks);
  });
}

// Weights packed at load (reference.pack_tiles): [panels of 64 columns][K / 64 blocks][4 column
// groups][16 row groups of 4 rows][64 bytes], each vector in KnInterleave's lane order, signed. A
// panel's bytes for all of K are contiguous, so each thread streams its panels in address order
// while a panel's sums stay in AMX tiles (or VPDPBUSD registers) for all of K: no pack pass and
// no partial sums in memory, and the stream runs at the machine's read bandwidth.
constexpr int64_t kTileRows = 16;  // activation rows of an AMX tile
constexpr int64_t kWideRows = 8;   // activation rows of a VPDPBUSD panel tile (TilesPanelVnniWide)

// One panel's int32 sums for rows q[0:rows] (rows configured by AmxBegin) into acc [rows][64].
__attribute__((target("amx-tile,amx-int8")))
void TilesPanelAmx(const int8_t* q, int64_t q_stride, const int8_t* panel, int64_t blocks, int32_t* acc) {
  _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4);
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* blk = panel + b * 4096;
    _tile_loadd(0, q + 64 * b, q_stride);
    _tile_loadd(5, blk, 64); _tile_dpbssd(1, 0, 5);
    _tile_loadd(5, blk + 1024, 64); _tile_dpbssd(2, 0, 5);
    _tile_loadd(5, blk + 2048, 64); _tile_dpbssd(3, 0, 5);
    _tile_loadd(5, blk + 3072, 64); _tile_dpbssd(4, 0, 5);
  }
  _tile_stored(1, acc, 256); _tile_stored(2, acc + 16, 256);
  _tile_stored(3, acc + 32, 256); _tile_stored(4, acc + 48, 256);
}

// How far ahead of its reads the VPDPBUSD path fetches the weight stream into L2, in bytes
// (ENCDEC_INT8_FETCH_AHEAD; 0: none). At 8 rows VPDPBUSD is compute-bound near the machine's
// read bandwidth, and without the fetch its loads and its products took turns: a cold
// 768 x 50265 head at 8 rows, 2 cores, read 12-15 GB/s with none and 18-22 with 32 KB.
int64_t FetchAhead() {
  static const int64_t ahead = [] {
    const char* env = std::getenv("ENCDEC_INT8_FETCH_AHEAD");
    return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) / 64 * 64 : int64_t{32} << 10;
  }();
  return ahead;
}

// The same with VPDPBUSD for R <= 4 rows (the weights flipped to the unsigned side as loaded);
// `fetch`: the panel's first read (a later row tile reads it again from L2).
template <int R>
void TilesPanelVnni(const int8_t* q, int64_t q_stride, const __m512i* panel, int64_t groups, __m512i acc[4][4],
                    bool fetch) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  ENCDEC_ZERO4(0) ENCDEC_ZERO4(1) ENCDEC_ZERO4(2) ENCDEC_ZERO4(3)
  const int64_t ahead = fetch ? FetchAhead() / 64 : 0;  // in vectors
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i* blk = panel + (g >> 4) * 64 + (g & 15);
    if (ahead)  // the four lines this group reads, `ahead` on: each line once (past the end: no fault)
      for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(blk + 16 * i + ahead), _MM_HINT_T1);
    __m512i v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm512_xor_si512(_mm512_load_si512(blk + 16 * i), flip);
    const int64_t k = 4 * g;
    ENCDEC_KN_ROW(0) ENCDEC_KN_ROW(1) ENCDEC_KN_ROW(2) ENCDEC_KN_ROW(3)
  }
  ENCDEC_STORE4(0) ENCDEC_STORE4(1) ENCDEC_STORE4(2) ENCDEC_STORE4(3)
}

// Rows R in 5..8 with VPDPBUSD: the panel's columns in two passes of 32 (column groups c0,
// c0 + 1), R x 2 sums in registers, so each weight vector is loaded and flipped once for all R
// rows (two tiles of 4 rows load and flip it twice: in L2, 8 rows ran at 29-30 GB/s of weight on
// one core this way against 35-38 in two passes). acc[r][c0..c0+1] takes the sums. `fetch`: as
// TilesPanelVnni's, in the first pass (the second reads the panel again from L2).
#define ENCDEC_BCAST2(r) \
  const __m512i b##r = R > r ? Broadcast4(q + r * q_stride + k) : _mm512_setzero_si512();
#define ENCDEC_DP2(r)                                        \
  if constexpr (R > r) {                                     \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, v0, b##r);        \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, v1, b##r);        \
  }
#define ENCDEC_ZERO2(r) __m512i a##r##0 = _mm512_setzero_si512(), a##r##1 = a##r##0;
#define ENCDEC_STORE2(r) \
  if constexpr (R > r) { acc[r][c0] = a##r##0; acc[r][c0 + 1] = a##r##1; }

template <int R>
void TilesPanelVnniWide(const int8_t* q, int64_t q_stride, const __m512i* panel, int64_t blocks, int c0,
                        __m512i acc[8][4], bool fetch) {
  static_assert(R >= 1 && R <= 8);
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  ENCDEC_ZERO2(0) ENCDEC_ZERO2(1) ENCDEC_ZERO2(2) ENCDEC_ZERO2(3)
  ENCDEC_ZERO2(4) ENCDEC_ZERO2(5) ENCDEC_ZERO2(6) ENCDEC_ZERO2(7)
  const int64_t ahead = fetch ? FetchAhead() / 64 : 0;  // in vectors
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i* blk = panel + 64 * b;
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g) {
      if (ahead)  // the four lines of this row group, all column groups: each line once
        for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(blk + 16 * i + g + ahead), _MM_HINT_T1);
      const __m512i v0 = _mm512_xor_si512(_mm512_load_si512(blk + 16 * c0 + g), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_load_si512(blk + 16 * (c0 + 1) + g), flip);
      const int64_t k = 64 * b + 4 * g;
      ENCDEC_BCAST2(0) ENCDEC_BCAST2(1) ENCDEC_BCAST2(2) ENCDEC_BCAST2(3)
      ENCDEC_BCAST2(4) ENCDEC_BCAST2(5) ENCDEC_BCAST2(6) ENCDEC_BCAST2(7)
      ENCDEC_DP2(0) ENCDEC_DP2(1) ENCDEC_DP2(2) ENCDEC_DP2(3) ENCDEC_DP2(4) ENCDEC_DP2(5) ENCDEC_DP2(6) ENCDEC_DP2(7)
    }
  }
  ENCDEC_STORE2(0) ENCDEC_STORE2(1) ENCDEC_STORE2(2) ENCDEC_STORE2(3)
  ENCDEC_STORE2(4) ENCDEC_STORE2(5) ENCDEC_STORE2(6) ENCDEC_STORE2(7)
}

// Rows r0 .. r0 + r (5 to 8) of a panel in two passes of TilesPanelVnniWide.
void TilesPanelVnniRows(const int8_t* q, int64_t q_stride, const __m512i* panel, int64_t blocks, int64_t r,
                        __m512i acc[8][4], bool fetch) {
  for (int c0 = 0; c0 < 4; c0 += 2) {
    const bool f = fetch && c0 == 0;
    switch (r) {
      case 5: TilesPanelVnniWide<5>(q, q_stride, panel, blocks, c0, acc, f); break;
      case 6: TilesPanelVnniWide<6>(q, q_stride, panel, blocks, c0, acc, f); break;
      case 7: TilesPanelVnniWide<7>(q, q_stride, panel, blocks, c0, acc, f); break;
      default: TilesPanelVnniWide<8>(q, q_stride, panel, blocks, c0, acc, f); break;
    }
  }
}

// y[m0:m1, panel p] from tiles (AmxBegin(m1 - m0) before, where `amx`).
void TilesPanel(const Quantized& xq, const int8_t* tiles, Columns s, float* y, int64_t m0, int64_t m1, int64_t N,
                int64_t p, bool amx) {
  const int64_t blocks = xq.Kp / 64, rows = m1 - m0;
  const int8_t* q = xq.q.data() + m0 * xq.Kp;
  const int64_t n0 = 64 * p, cols = std::min<int64_t>(64, N - n0);
  const int8_t* panel = tiles + p * blocks * 4096;
  if (amx) {
    alignas(64) int32_t acc[kTileRows * 64];
    TilesPanelAmx(q, xq.Kp, panel, blocks, acc);
    for (int64_t r = 0; r < rows; ++r)
      StorePanelRow((const __m512i*)(acc + 64 * r), 0, xq.scale[m0 + r], s.at(n0), y + (m0 + r) * N + n0, cols);
    return;
  }
  // Even row tiles of at most kWideRows: 12 rows run as 6 + 6; tiles of 4 rows or fewer as 4 x 4.
  const int64_t row_tiles = (rows + kWideRows - 1) / kWideRows;
  for (int64_t t = 0, r0 = 0; t < row_tiles; ++t) {
    const int64_t r = (rows - r0) / (row_tiles - t);
    __m512i acc[8][4];
    const int8_t* qt = q + r0 * xq.Kp;
    const __m512i* pv = (const __m512i*)panel;
    switch (r) {
      case 5: case 6: case 7: case 8: TilesPanelVnniRows(qt, xq.Kp, pv, blocks, r, acc, t == 0); break;
      case 1: TilesPanelVnni<1>(qt, xq.Kp, pv, 16 * blocks, acc, t == 0); break;
      case 2: TilesPanelVnni<2>(qt, xq.Kp, pv, 16 * blocks, acc, t == 0); break;
      case 3: TilesPanelVnni<3>(qt, xq.Kp, pv, 16 * blocks, acc, t == 0); break;
      default: TilesPanelVnni<4>(qt, xq.Kp, pv, 16 * blocks, acc, t == 0); break;
    }
    for (int64_t i = 0; i < r; ++i) {
      const int64_t m = m0 + r0 + i;
      StorePanelRow(acc[i], xq.excess[m], xq.scale[m], s.at(n0), y + m * N + n0, cols);
    }
    r0 += r;
  }
}

// Rows in tiles of at most 16 (even: 20 rows run as 10 + 10) times column chunks, enough tasks
// to share the threads. One tile of rows (decode): the panels are shared as a stream
// (ParallelStream: each thread reads on in address order, and none waits idle on another's last
// chunk).
void TilesMatmul(ffi::ThreadPool& pool, const Quantized& xq, const int8_t* tiles, Columns s, float* y,
                 int64_t M, int64_t K, int64_t N, int64_t threads) {
  const bool amx = AmxUsable();
  const int64_t panels = (N + 63) / 64, row_tiles = (M + kTileRows - 1) / kTileRows;
  const bool parallel = K * N >= kStreamParallelBytes || M * K * N >= kParallelMacs;
  if (row_tiles == 1) {
    ParallelStream(
        pool, panels,
        [&](encdec::StreamClaims& claims) {
          int64_t p;
          bool jumped;
          if (!claims.Next(&p, &jumped)) return;
          if (amx) AmxBegin(M);
          do TilesPanel(xq, tiles, s, y, 0, M, N, p, amx);
          while (claims.Next(&p, &jumped));
          if (amx) AmxEnd();
        },
        parallel);
    return;
  }
  const int64_t want = parallel ? 2 * threads : 1;
  const int64_t col_chunks = std::min(panels, std::max<int64_t>(1, (want + row_tiles - 1) / row_tiles));
  ParallelFor(pool, row_tiles * col_chunks, [&](int64_t task) {
    const int64_t t = task / col_chunks, c = task % col_chunks;
    const int64_t m0 = M * t / row_tiles, m1 = M * (t + 1) / row_tiles;
    if (amx) AmxBegin(m1 - m0);
    for (int64_t p = panels * c / col_chunks; p < panels * (c + 1) / col_chunks; ++p)
      TilesPanel(xq, tiles, s, y, m0, m1, N, p, amx);
    if (amx) AmxEnd();
  });
}

// The 16-lane sums of four vectors, as one vector of four (one VPHADDD-style tree instead of
// four full reductions: at K = 768 the reductions cost as much as the products).
inline __m128i Sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

#define ENCDEC_NK_ROW(r)                                                           \
  if constexpr (R > r) {                                                           \
    const __m512i qv = _mm512_loadu_si512(q + r * q_stride + k);                   \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, wv0, qv);                               \
    if constexpr (C > 1) a##r##1 = _mm512_dpbusd_epi32(a##r##1, wv1, qv);          \
    if constexpr (C > 2) a##r##2 = _mm512_dpbusd_epi32(a##r##2, wv2, qv);          \
    if constexpr (C > 3) a##r##3 = _mm512_dpbusd_epi32(a##r##3, wv3, qv);          \
  }
#define ENCDEC_NK_LOAD(c) \
  const __m512i wv##c = C > c ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + (n0 + c) * K + k), flip) : flip;

// y[m0:m0+R, n0:n0+C] for an NK weight ([N, K], k contiguous; R, C <= 4).
template <int R, int C>
void NkTile(const Quantized& xq, const int8_t* w, Columns w_scale, float* y, int64_t K,
            int64_t N, int64_t m0, int64_t n0, bool prefetch) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int8_t* q = xq.q.data() + m0 * xq.Kp;
  const int64_t q_stride = xq.Kp;
  ENCDEC_ZERO4(0) ENCDEC_ZERO4(1) ENCDEC_ZERO4(2) ENCDEC_ZERO4(3)
  for (int64_t k = 0; k < K; k += 64) {
    // Weight bytes past K are masked to 0 before the flip: they meet activations that are 0.
    const __mmask64 mask = ColumnMask(K - k);
    // The weight streams in order; the hardware prefetcher alone falls behind once each line
    // also costs R x C products, so fetch two tiles (8 rows) ahead.
    if (prefetch)
      for (int c = 0; c < C; ++c) _mm_prefetch((const char*)(w + (n0 + 2 * kNkCols + c) * K + k), _MM_HINT_T0);
    ENCDEC_NK_LOAD(0) ENCDEC_NK_LOAD(1) ENCDEC_NK_LOAD(2) ENCDEC_NK_LOAD(3)
    ENCDEC_NK_ROW(0) ENCDEC_NK_ROW(1) ENCDEC_NK_ROW(2) ENCDEC_NK_ROW(3)
  }
  __m512i acc[4][4];
  ENCDEC_STORE4(0) ENCDEC_STORE4(1) ENCDEC_STORE4(2) ENCDEC_STORE4(3)
  for (int r = 0; r < R; ++r) {
    alignas(16) int32_t sums[4];
    _mm_store_si128((__m128i*)sums, Sum4(acc[r][0], C > 1 ? acc[r][1] : flip, C > 2 ? acc[r][2] : flip,
                                         C > 3 ? acc[r][3] : flip));
    const float xs = xq.scale[m0 + r];
    const int32_t excess = xq.excess[m0 + r];
    for (int c = 0; c < C; ++c) {
      const float v = (float)(sums[c] - excess) * xs * w_scale.scale[n0 + c];
      y[(m0 + r) * N + n0 + c] = w_scale.bias ? v + w_scale.bias[n0 + c] : v;
    }
  }
}

template <int C>
void NkColumns(const Quantized& xq, const int8_t* w, Columns s, float* y, int64_t M, int64_t K,
               int64_t N, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kNkRows <= M; m0 += kNkRows) NkTile<kNkRows, C>(xq, w, s, y, K, N, m0, n0, m0 == 0);
  switch (M - m0) {
    case 1: NkTile<1, C>(xq, w, s, y, K, N, m0, n0, m0 == 0); break;
    case 2: NkTile<2, C>(xq, w, s, y, K, N, m0, n0, m0 == 0); break;
    case 3: NkTile<3, C>(xq, w, s, y, K, N, m0, n0, m0 == 0); break;
  }
}

void NkPanel(const Quantized& xq, const int8_t* w, Columns s, float* y, int64_t M, int64_t K,
             int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kNkCols <= n1; n += kNkCols) NkColumns<kNkCols>(xq, w, s, y, M, K, N, n);
  for (; n < n1; ++n) NkColumns<1>(xq, w, s, y, M, K, N, n);
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                      int64_t w_layout) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  const bool nk_layout = w_layout == kLayoutNk, tiled = w_layout == kLayoutTiles;
  if (x_dims.size() != 2 || w_dims.size() != (tiled ? 3u : 2u))
    return ffi::Error::InvalidArgument("int8 matmul: x must be a matrix, w a matrix (or [P, K / 64, 4096] tiles)");
  const int64_t M = x_dims[0], K = x_dims[1];
  const int64_t N = tiled ? (int64_t)w_scale.element_count() : nk_layout ? w_dims[0] : w_dims[1];
  const bool tiles_fit = tiled && w_dims[0] == (N + 63) / 64 && w_dims[1] == (K + 63) / 64 && w_dims[2] == 4096;
  if ((tiled ? !tiles_fit : (nk_layout ? w_dims[1] : w_dims[0]) != K) || (int64_t)w_scale.element_count() != N)
    return ffi::Error::InvalidArgument("int8 matmul: x, w and w_scale disagree on K or N");
  if (bias.element_count() != 0 && (int64_t)bias.element_count() != N)
    return ffi::Error::InvalidArgument("int8 matmul: bias must be [N] (or empty)");
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* out = y->typed_data();
  const float* bd = bias.element_count() ? bias.typed_data() : nullptr;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = bd ? bd[n] : 0.0f;
    return ffi::Error::Success();
  }
  Quantized& xq = Allocate(M, K);
  const float* xd = x.typed_data();
  const int64_t threads = pool.num_threads() + 1;  // the pool's and the calling one
  // Rows quantized by several threads only when there are many (the encoder's).
  const int64_t row_chunks = M * K >= kParallelQuantize ? std::min<int64_t>(M, 4 * threads) : 1;
  ParallelFor(pool, row_chunks, [&](int64_t c) {
    for (int64_t m = M * c / row_chunks; m < M * (c + 1) / row_chunks; ++m)
      QuantizeRow(xd, K, m, xq);
  });
  const int8_t* wd = w.typed_data();
  const Columns sd{w_scale.typed_data(), bd};
  if (tiled) {
    TilesMatmul(pool, xq, wd, sd, out, M, K, N, std::max<int64_t>(1, pool.num_threads()));
    return ffi::Error::Success();
  }
  if (!nk_layout && M <= kStreamRows) {
    KnDecode(pool, xq, wd, sd, out, M, K, N, std::max<int64_t>(1, pool.num_threads()));
    return ffi::Error::Success();
  }
  // Threads pay off for large weights (decode) or many rows (the encoder).
  const bool parallel = K * N >= kParallelBytes || M * K * N >= kParallelMacs;
  // Column units: 64-column panels (KN) or groups of kNkCols outputs (NK).
  const int64_t width = nk_layout ? kNkCols : 64, units = (N + width - 1) / width;
  const int64_t chunks = parallel ? std::min<int64_t>(units, 8 * threads) : 1;
  ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t u0 = units * c / chunks, u1 = units * (c + 1) / chunks;
    if (nk_layout) {
      NkPanel(xq, wd, sd, out, M, K, N, width * u0, std::min<int64_t>(N, width * u1));
    } else {
      for (int64_t p = u0; p < u1; ++p) KnPanel(xq, wd, sd, out, M, K, N, width * p);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EncdecInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [N], or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("w_layout"));


// Whether the tiles path multiplies with AMX in this process (else VPDPBUSD): what the bench
// records, asked of the kernel rather than derived again from /proc/cpuinfo (the kernel also
// needs the Linux tile-state permission, and honours ENCDEC_INT8_AMX=0).
extern "C" int EncdecInt8UsesAmx() { return AmxUsable() ? 1 : 0; }
