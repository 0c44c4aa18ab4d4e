// Native CPU kernels for the exact radix select of ire_optax/_src/selection.py.
//
// XLA:CPU runs a scatter-add (the 65,536-bin histogram of the selection) as a
// sequential loop of several ns per value, while an optimizer update costs about
// 1 ns per parameter; these two XLA FFI handlers compute the same histograms at
// about 1 ns per value. ire_optax compiles this file on first use (see native.py)
// and falls back to the XLA scatter when it cannot.
//
//   IreHistHigh(x f32[...]) -> u32[65536]: counts of the top 16 bits of the keys.
//   IreHistLow(x f32[...], high u32[]) -> u32[65536]: counts of the low 16 bits of
//       the keys whose top 16 bits equal `high`.
//
// Keys are those of selection.ordered_keys: unsigned order = float order, -0.0
// and +0.0 tie, denormals tie with zero (XLA:CPU flushes them), NaN is largest.
#include <cstdint>
#include <cstring>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// selection.ordered_keys, branch-free so that the compiler vectorises it.
static inline uint32_t OrderedKey(uint32_t bits) {
  const uint32_t exp = bits & 0x7F800000u;
  const uint32_t flip = (0u - (bits >> 31)) | 0x80000000u;
  uint32_t key = bits ^ flip;
  key = exp == 0 ? 0x80000000u : key;
  key = (exp == 0x7F800000u && (bits & 0x007FFFFFu)) ? 0xFFFFFFFFu : key;
  return key;
}

constexpr size_t kBlock = 512;

static ffi::Error HighImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::U32> hist) {
  uint32_t* h = hist->typed_data();
  std::memset(h, 0, sizeof(uint32_t) * 65536);
  const uint32_t* d = reinterpret_cast<const uint32_t*>(x.typed_data());
  const size_t n = x.element_count();
  uint32_t keys[kBlock];
  for (size_t s = 0; s < n; s += kBlock) {
    const size_t m = n - s < kBlock ? n - s : kBlock;
    for (size_t i = 0; i < m; ++i) keys[i] = OrderedKey(d[s + i]) >> 16;
    for (size_t i = 0; i < m; ++i) h[keys[i]]++;
  }
  return ffi::Error::Success();
}

static ffi::Error LowImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> high,
                          ffi::ResultBuffer<ffi::U32> hist) {
  uint32_t* h = hist->typed_data();
  std::memset(h, 0, sizeof(uint32_t) * 65536);
  const uint32_t hi = high.typed_data()[0];
  const uint32_t* d = reinterpret_cast<const uint32_t*>(x.typed_data());
  const size_t n = x.element_count();
  // Blocks of 16: a vectorised test of the block, and a scalar pass only over the rare
  // blocks that hold a key of bucket `hi`.
  constexpr size_t kLanes = 16;
  size_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    uint32_t any = 0;
    for (size_t i = 0; i < kLanes; ++i) any |= (OrderedKey(d[s + i]) >> 16) == hi;
    if (!any) continue;
    for (size_t i = 0; i < kLanes; ++i) {
      const uint32_t key = OrderedKey(d[s + i]);
      if ((key >> 16) == hi) h[key & 0xFFFFu]++;
    }
  }
  for (; s < n; ++s) {
    const uint32_t key = OrderedKey(d[s]);
    if ((key >> 16) == hi) h[key & 0xFFFFu]++;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(IreHistHigh, HighImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::U32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(IreHistLow, LowImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::U32>>()
        .Ret<ffi::Buffer<ffi::U32>>());
