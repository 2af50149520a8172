// Decode attention over the engine's slot window on CPU (AVX-512), as an XLA FFI custom call:
// the arithmetic of paged_attention/reference.py's attention_over_keys with slots_first (one
// query per slot and head, keys [B, N, K, H], the first lengths[b] of them valid).
//
// Why a kernel: XLA:CPU runs this as a loop over slots whose every iteration copies the slot's
// K and V rows out of the window before its two products (a dynamic slice feeding a library
// dot), so a t5-small step spent ~7 of its ~10 ms in those copies. Here every (slot, head) reads
// its first lengths[b] rows in place, once, and skips the rest of the window.
//
// Slots may read another slot's rows (source[b]; the beams of a group share one copy of their
// cross rows): slots reading the same rows are attended together, each row loaded once.
//
// Per (slot, head): logits[k] = scale * q . K[k] (+ bias[n, L - 1 - k], the T5 decoder bias by
// distance), softmax over k < L in float32, out = sum_k p[k] V[k] / sum_k p[k]. Units (slots
// reading the same rows, up to 4 heads of them at once) are shared with XLA's intra-op thread
// pool.
//
// K and V are float32 or bfloat16 (a window kept in bfloat16: half the bytes a step reads, and
// attention at decode shapes is bound by them); the arithmetic is float32 either way.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu_math.h"
#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using encdec::Exp;
using encdec::ParallelFor;

namespace {

constexpr int64_t kParallelBytes = 1 << 18;  // K/V bytes read below which one thread does it all

inline __mmask16 Lanes(int64_t count) { return count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1); }

// 16 (masked) elements of a K or V row as float32: bfloat16 is float32's upper half.
inline __m512 Load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 Load16(const uint16_t* p, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename T>
struct Problem {
  const float *q;
  const T *k, *v;
  const float* bias;  // bias: [N, K] by distance, or null
  const int32_t *lengths, *source;
  float* out;
  int64_t B, N, K, H;
  float scale;
};

// Up to kMaxQueries slots that read the same rows (one source slot, one length): every K/V row
// is loaded once for all of them. Beams of a group share their cross rows, so beam search reads
// a group's encoder K/V once, not once per beam.
constexpr int kMaxQueries = 4;
// A unit takes up to kMaxHeads heads of those slots in one pass, a row of each per key: one core
// reading one head's 16 KB of rows at a time kept too few cache lines in flight (7 GB/s from
// memory); kMaxHeads streams at once, each fetched kAhead rows ahead, keep more.
constexpr int kMaxHeads = 4;
constexpr int64_t kAhead = 8;
// Accumulators a unit keeps in registers: heads x queries x 16-lane vectors of a row.
constexpr int kMaxAccumulators = 16;

struct Unit {
  int64_t slot[kMaxQueries];
  int64_t source, length, head;
  int count, heads;
};

// One unit of QG queries and G heads with H <= 16 * NV: queries and output accumulators stay in
// registers (G * QG * NV <= kMaxAccumulators).
template <typename T, int NV, int QG, int G>
void Attend(const Problem<T>& p, const Unit& u, std::vector<float>& logits) {
  const int64_t H = p.H, L = u.length;
  constexpr int64_t kLines = (NV * 16 * sizeof(T) + 63) / 64;  // cache lines a row spans
  const __mmask16 last = Lanes(H - 16 * (NV - 1));
  auto mask = [&](int j) { return j == NV - 1 ? last : (__mmask16)0xFFFF; };
  auto fetch = [&](const T* row) {
    for (int64_t c = 0; c < kLines; ++c) _mm_prefetch((const char*)row + 64 * c, _MM_HINT_T0);
  };
  const T *keys[G], *values[G];
  __m512 q_vec[G][QG][NV];
  for (int h = 0; h < G; ++h) {
    const int64_t n = u.head + h;
    keys[h] = p.k + (u.source * p.N + n) * p.K * H;
    values[h] = p.v + (u.source * p.N + n) * p.K * H;
    for (int g = 0; g < QG; ++g)
      for (int j = 0; j < NV; ++j)
        q_vec[h][g][j] = _mm512_maskz_loadu_ps(mask(j), p.q + (u.slot[g] * p.N + n) * H + 16 * j);
  }
  auto x = [&](int h, int g) { return logits.data() + (h * QG + g) * (p.K + 16); };

  for (int64_t t = 0; t < L; ++t)
    for (int h = 0; h < G; ++h) {
      const T* row = keys[h] + t * H;
      if (t + kAhead < L) fetch(row + kAhead * H);
      __m512 k_vec[NV];
      for (int j = 0; j < NV; ++j) k_vec[j] = Load16(row + 16 * j, mask(j));
      for (int g = 0; g < QG; ++g) {
        __m512 acc = _mm512_mul_ps(q_vec[h][g][0], k_vec[0]);
        for (int j = 1; j < NV; ++j) acc = _mm512_fmadd_ps(q_vec[h][g][j], k_vec[j], acc);
        x(h, g)[t] = p.scale * _mm512_reduce_add_ps(acc);
      }
    }
  for (int h = 0; h < G; ++h)  // the first rows of V, while the softmax runs
    for (int64_t t = 0; t < std::min(kAhead, L); ++t) fetch(values[h] + t * H);
  float denom[G][QG];
  for (int h = 0; h < G; ++h)
    for (int g = 0; g < QG; ++g) {
      float* xg = x(h, g);
      if (p.bias) {
        const float* bias = p.bias + (u.head + h) * p.K + (L - 1);  // key t sits L - 1 - t back
        for (int64_t t = 0; t < L; ++t) xg[t] += bias[-t];
      }
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int64_t t = 0; t < L; t += 16)
        top = _mm512_mask_max_ps(top, Lanes(L - t), top, _mm512_maskz_loadu_ps(Lanes(L - t), xg + t));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < L; t += 16) {
        const __mmask16 lanes = Lanes(L - t);
        const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, xg + t), m));
        _mm512_mask_storeu_ps(xg + t, lanes, e);
        sum = _mm512_mask_add_ps(sum, lanes, sum, e);
      }
      denom[h][g] = _mm512_reduce_add_ps(sum);
    }

  __m512 acc[G][QG][NV];
  for (int h = 0; h < G; ++h)
    for (int g = 0; g < QG; ++g)
      for (int j = 0; j < NV; ++j) acc[h][g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t)
    for (int h = 0; h < G; ++h) {
      const T* row = values[h] + t * H;
      if (t + kAhead < L) fetch(row + kAhead * H);
      __m512 v_vec[NV];
      for (int j = 0; j < NV; ++j) v_vec[j] = Load16(row + 16 * j, mask(j));
      for (int g = 0; g < QG; ++g) {
        const __m512 w = _mm512_set1_ps(x(h, g)[t]);
        for (int j = 0; j < NV; ++j) acc[h][g][j] = _mm512_fmadd_ps(w, v_vec[j], acc[h][g][j]);
      }
    }
  for (int h = 0; h < G; ++h)
    for (int g = 0; g < QG; ++g) {
      float* out = p.out + (u.slot[g] * p.N + u.head + h) * H;
      const __m512 d = _mm512_set1_ps(denom[h][g]);
      for (int j = 0; j < NV; ++j) _mm512_mask_storeu_ps(out + 16 * j, mask(j), _mm512_div_ps(acc[h][g][j], d));
    }
}

template <typename T>
using AttendFn = void (*)(const Problem<T>&, const Unit&, std::vector<float>&);

// The most heads a unit of `queries` queries over rows of `nv` vectors takes.
inline int MaxHeads(int64_t nv, int queries) {
  int heads = kMaxHeads;
  while (heads > 1 && heads * queries * nv > kMaxAccumulators) heads /= 2;
  return heads;
}

template <typename T, int NV, int QG>
AttendFn<T> ForHeads(int heads) {
  if constexpr (4 * QG * NV <= kMaxAccumulators) if (heads == 4) return &Attend<T, NV, QG, 4>;
  if constexpr (2 * QG * NV <= kMaxAccumulators) if (heads == 2) return &Attend<T, NV, QG, 2>;
  return &Attend<T, NV, QG, 1>;
}

template <typename T, int NV>
AttendFn<T> ForQueries(int count, int heads) {
  switch (count) {
    case 1: return ForHeads<T, NV, 1>(heads);
    case 2: return ForHeads<T, NV, 2>(heads);
    case 3: return ForHeads<T, NV, 3>(heads);
    default: return ForHeads<T, NV, 4>(heads);
  }
}

template <typename T, int... NVs>
AttendFn<T> Select(int64_t H, int count, int heads, std::integer_sequence<int, NVs...>) {
  const int64_t nv = (H + 15) / 16;
  AttendFn<T> fn = nullptr;
  ((fn = (nv == NVs + 1 ? ForQueries<T, NVs + 1>(count, heads) : fn)), ...);
  return fn;
}

// Slots with keys, grouped by (source, length) into units of at most kMaxQueries, and heads
// into blocks of 4, 2 or 1 (as many as the registers hold).
template <typename T>
std::vector<Unit> Units(const Problem<T>& p) {
  std::vector<std::pair<std::pair<int64_t, int64_t>, int64_t>> keyed;  // ((source, length), slot)
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t L = std::clamp<int64_t>(p.lengths[b], 0, p.K);
    if (L > 0) keyed.push_back({{p.source[b], L}, b});
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<Unit> groups;
  for (size_t i = 0; i < keyed.size();) {
    size_t end = i;
    while (end < keyed.size() && keyed[end].first == keyed[i].first) ++end;
    // Split a run evenly: 5 beams are 3 + 2 queries, not 4 + 1.
    const int64_t run = end - i, parts = (run + kMaxQueries - 1) / kMaxQueries;
    for (int64_t part = 0; part < parts; ++part) {
      Unit u{};
      u.source = keyed[i].first.first;
      u.length = keyed[i].first.second;
      for (int64_t r = run * part / parts; r < run * (part + 1) / parts; ++r) u.slot[u.count++] = keyed[i + r].second;
      groups.push_back(u);
    }
    i = end;
  }
  std::vector<Unit> units;
  units.reserve(groups.size() * p.N);
  const int64_t nv = (p.H + 15) / 16;
  for (const Unit& g : groups)
    for (int64_t n = 0; n < p.N;) {
      int heads = MaxHeads(nv, g.count);
      while (heads > p.N - n) heads /= 2;
      units.push_back(g);
      units.back().head = n;
      units.back().heads = heads;
      n += heads;
    }
  return units;
}

template <ffi::DataType KV, typename T>
ffi::Error WindowAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<KV> k,
                           ffi::Buffer<KV> v, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> source,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions();
  if (q_dims.size() != 3 || k_dims.size() != 4)
    return ffi::Error::InvalidArgument("window attention: q must be [B, N, H] and k, v [B, N, K, H]");
  const int64_t B = q_dims[0], N = q_dims[1], H = q_dims[2], K = k_dims[2];
  if (k_dims[0] != B || k_dims[1] != N || k_dims[3] != H ||
      v.element_count() != k.element_count() || v.dimensions().size() != 4 || v.dimensions()[2] != K)
    return ffi::Error::InvalidArgument("window attention: q, k and v disagree on B, N or H");
  if ((int64_t)lengths.element_count() != B || (int64_t)source.element_count() != B)
    return ffi::Error::InvalidArgument("window attention: lengths and source must be [B]");
  if (bias.element_count() != 0 && (int64_t)bias.element_count() != N * K)
    return ffi::Error::InvalidArgument("window attention: bias must be [N, K] (or empty)");
  if (H > 256) return ffi::Error::InvalidArgument("window attention: head size above 256");
  if (B * N * H == 0) return ffi::Error::Success();
  const int32_t* src = source.typed_data();
  for (int64_t b = 0; b < B; ++b)
    if (src[b] < 0 || src[b] >= B) return ffi::Error::InvalidArgument("window attention: a source outside the slots");
  const Problem<T> p{q.typed_data(), (const T*)k.typed_data(), (const T*)v.typed_data(),
                  bias.element_count() ? bias.typed_data() : nullptr, lengths.typed_data(), src,
                  out->typed_data(), B, N, K, H, scale};
  std::fill(p.out, p.out + B * N * H, 0.0f);  // slots without keys
  const std::vector<Unit> units = Units(p);
  int64_t bytes = 0;
  for (const Unit& u : units) bytes += u.length * u.heads * H * 2 * sizeof(T);
  const int64_t count = units.size(), threads = pool.num_threads() + 1;
  const int64_t chunks = bytes >= kParallelBytes ? std::min<int64_t>(count, 8 * threads) : 1;
  ParallelFor(pool, chunks, [&](int64_t c) {
    std::vector<float> logits(kMaxHeads * kMaxQueries * (K + 16));
    for (int64_t i = count * c / chunks; i < count * (c + 1) / chunks; ++i)
      Select<T>(H, units[i].count, units[i].heads, std::make_integer_sequence<int, 16>{})(p, units[i], logits);
  });
  return ffi::Error::Success();
}

}  // namespace

#define ENCDEC_WINDOW_HANDLER(name, KV, T)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (WindowAttention<KV, T>),          \
                                ffi::Ffi::Bind()                         \
                                    .Ctx<ffi::ThreadPool>()              \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Arg<ffi::Buffer<KV>>()              \
                                    .Arg<ffi::Buffer<KV>>()              \
                                    .Arg<ffi::Buffer<ffi::S32>>()        \
                                    .Arg<ffi::Buffer<ffi::S32>>()        \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Ret<ffi::Buffer<ffi::F32>>()        \
                                    .Attr<float>("scale"));

ENCDEC_WINDOW_HANDLER(EncdecWindowAttention, ffi::F32, float)
// bfloat16 bits as uint16: what the engine's window stores (XLA:CPU copies a whole array to
// bitcast it to bfloat16, but folds a bitcast back).
ENCDEC_WINDOW_HANDLER(EncdecWindowAttentionBf16, ffi::U16, uint16_t)
