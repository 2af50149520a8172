// A decode step's new K/V rows written in place on CPU, as an XLA FFI custom call whose output
// aliases its first operand: dst[a[b], :, c[b], :] = rows[b] for every b whose (a, c) lies in
// dst, any element type (the bytes are copied). dst is [A, N, C..., H]: c indexes its middle axes
// flattened (a pool's [P, G] pages and rows), so XLA need not reshape what it aliases (it copied
// a reshaped pool).
//
// Why a kernel: a step writes one row per slot into every layer's self pool and window, each a
// scatter of B x N runs of H elements, and XLA:CPU's scatter loop took 15-40 us a layer for
// what is a few KB (24 of them a step: ~0.4 ms of a 3.4 ms t5-small int8 step).

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error WriteRows(ffi::AnyBuffer dst, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> a, ffi::Buffer<ffi::S32> c,
                     ffi::Result<ffi::AnyBuffer> out) {
  const auto d = dst.dimensions(), r = rows.dimensions();
  if (d.size() < 4 || r.size() != 3)
    return ffi::Error::InvalidArgument("put rows: dst must be [A, N, C..., H] and rows [B, N, H]");
  const int64_t A = d[0], N = d[1], H = d[d.size() - 1], B = r[0];
  int64_t C = 1;  // the middle axes, flattened (a pool's pages and their rows)
  for (size_t i = 2; i + 1 < d.size(); ++i) C *= d[i];
  if (r[1] != N || r[2] != H || dst.element_type() != rows.element_type())
    return ffi::Error::InvalidArgument("put rows: rows must be [B, N, H] of dst's N, H and dtype");
  if ((int64_t)a.element_count() != B || (int64_t)c.element_count() != B)
    return ffi::Error::InvalidArgument("put rows: a and c must be [B]");
  char* to = (char*)out->untyped_data();
  if (to != dst.untyped_data()) std::memcpy(to, dst.untyped_data(), dst.size_bytes());  // not aliased
  const int64_t bytes = rows.element_count() ? (int64_t)rows.size_bytes() / (B * N) : 0;  // one run of H
  const char* from = (const char*)rows.untyped_data();
  const int32_t *ai = a.typed_data(), *ci = c.typed_data();
  for (int64_t b = 0; b < B; ++b) {  // every line's miss in flight at once
    if (ai[b] < 0 || ai[b] >= A || ci[b] < 0 || ci[b] >= C) continue;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(to + ((ai[b] * N + n) * C + ci[b]) * bytes + i, 1);
  }
  for (int64_t b = 0; b < B; ++b) {
    if (ai[b] < 0 || ai[b] >= A || ci[b] < 0 || ci[b] >= C) continue;  // dropped
    for (int64_t n = 0; n < N; ++n)
      std::memcpy(to + ((ai[b] * N + n) * C + ci[b]) * bytes, from + (b * N + n) * bytes, bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EncdecPutRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
