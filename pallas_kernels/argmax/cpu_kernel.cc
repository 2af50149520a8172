// Row argmax of a float32 matrix on CPU (AVX-512), as an XLA FFI custom call: jnp.argmax's
// result (the first maximum; the first NaN where a row has one). A second target also returns
// each row's softmax normalizer (its maximum and sum_v exp(x_v - max)), which a decode step
// needs for the chosen token's log-probability: XLA's reductions over the vocabulary took
// ~0.2 ms of a t5-small step at 8 rows; the row is in cache after the argmax.
//
// Why a kernel: XLA:CPU lowers argmax to a scalar variadic (value, index) reduction; greedy
// decoding's argmax over 8 x 32128 logits took 0.57 ms of a 6 ms t5-small step, against ~0.05
// ms to read them.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_math.h"
#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using encdec::Exp;
using encdec::ParallelFor;

namespace {

constexpr int64_t kParallelElements = 1 << 17;  // below, one thread does every row

// One lane set's running (maximum, index) over the vectors it is given, in row order.
struct LaneMax {
  __m512 best = _mm512_set1_ps(-INFINITY);
  // Lanes past the row lose every comparison and every tie.
  __m512i index = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());

  void Take(__m512 x, __m512i at, __mmask16 lanes) {
    // Strictly greater, or the first -inf of a lane still at its start: a lane keeps its first
    // maximum, and a row of -inf answers 0 as jnp.argmax does.
    const __mmask16 take = _mm512_mask_cmp_ps_mask(lanes, x, best, _CMP_GT_OQ) |
                           _mm512_mask_cmp_epi32_mask(lanes, index, _mm512_set1_epi32(
                               std::numeric_limits<int32_t>::max()), _MM_CMPINT_EQ);
    best = _mm512_mask_mov_ps(best, take, x);
    index = _mm512_mask_mov_epi32(index, take, at);
  }

  // The other's lanes where they hold a greater value, or an equal one earlier in the row.
  void Merge(const LaneMax& o) {
    const __mmask16 take = _mm512_cmp_ps_mask(o.best, best, _CMP_GT_OQ) |
                           (_mm512_cmp_ps_mask(o.best, best, _CMP_EQ_OQ) &
                            _mm512_cmp_epi32_mask(o.index, index, _MM_CMPINT_LT));
    best = _mm512_mask_mov_ps(best, take, o.best);
    index = _mm512_mask_mov_epi32(index, take, o.index);
  }
};

// Four lane sets take every fourth vector: one set's compare-and-select chain bounded the loop
// (8 x 32128 logits took ~70 us with one).
int32_t RowArgmax(const float* x, int64_t V) {
  LaneMax m[4];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t v = 0;
  for (; v + 64 <= V; v += 64) {
    __m512 x_vec[4];
    __mmask16 nan = 0;
    for (int i = 0; i < 4; ++i) {
      x_vec[i] = _mm512_loadu_ps(x + v + 16 * i);
      nan |= _mm512_cmp_ps_mask(x_vec[i], x_vec[i], _CMP_UNORD_Q);
    }
    if (nan) break;  // the tail loop below finds the first one
    for (int i = 0; i < 4; ++i) m[i].Take(x_vec[i], _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)(v + 16 * i))), 0xFFFF);
  }
  for (; v < V; v += 16) {
    const __mmask16 lanes = V - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - v)) - 1);
    const __m512 x_vec = _mm512_maskz_loadu_ps(lanes, x + v);
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(lanes, x_vec, x_vec, _CMP_UNORD_Q);
    if (nan) return (int32_t)(v + __builtin_ctz(nan));
    m[0].Take(x_vec, _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)v)), lanes);
  }
  m[0].Merge(m[1]), m[2].Merge(m[3]), m[0].Merge(m[2]);
  const float top = _mm512_reduce_max_ps(m[0].best);
  const __mmask16 at_top = _mm512_cmp_ps_mask(m[0].best, _mm512_set1_ps(top), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(at_top, m[0].index);
}

// Checks that x is [rows, V] with V > 0 (unless there are no rows), then body(r, row r, V) for
// every row, rows split over threads once rows * V reaches `parallel` elements: in chunks of
// a few rows each, claimed as threads free up (8 rows in threads + 1 = 3 chunks left one thread
// 5 rows to the other's 3).
template <typename Body>
ffi::Error ForEachRow(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, int64_t parallel, Body body) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("argmax: x must be [rows, V]");
  const int64_t rows = dims[0], V = dims[1];
  if (V == 0 && rows) return ffi::Error::InvalidArgument("argmax: empty rows have no maximum");
  const float* xd = x.typed_data();
  const int64_t chunks = rows * V >= parallel ? std::min<int64_t>(rows, 4 * (pool.num_threads() + 1)) : 1;
  ParallelFor(pool, chunks, [&](int64_t c) {
    for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r) body(r, xd + r * V, V);
  });
  return ffi::Error::Success();
}

ffi::Error Argmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  int32_t* od = out->typed_data();
  return ForEachRow(pool, x, kParallelElements,
                    [&](int64_t r, const float* row, int64_t V) { od[r] = RowArgmax(row, V); });
}

// sum_v exp(x_v - top) over a row whose maximum is top; NaN where top is not finite (a NaN or
// +inf row, or every entry -inf), as jax.nn.log_softmax's x - max is there.
float SumExp(const float* x, int64_t V, float top) {
  if (!std::isfinite(top)) return std::numeric_limits<float>::quiet_NaN();
  const __m512 m = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t v = 0; v < V; v += 16) {
    const __mmask16 lanes = V - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - v)) - 1);
    sum = _mm512_mask_add_ps(sum, lanes, sum, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + v), m)));
  }
  return _mm512_reduce_add_ps(sum);
}

ffi::Error ArgmaxNormalizer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out,
                            ffi::ResultBuffer<ffi::F32> top, ffi::ResultBuffer<ffi::F32> sum_exp) {
  int32_t* od = out->typed_data();
  float *td = top->typed_data(), *sd = sum_exp->typed_data();
  // The exponentials make a row cost ~10x its argmax: rows split over threads sooner.
  return ForEachRow(pool, x, kParallelElements / 8, [&](int64_t r, const float* row, int64_t V) {
    od[r] = RowArgmax(row, V);
    td[r] = row[od[r]];
    sd[r] = SumExp(row, V, td[r]);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EncdecArgmaxNormalizer, ArgmaxNormalizer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EncdecArgmax, Argmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
