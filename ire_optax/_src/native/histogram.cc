// Native CPU kernels for the exact radix select of ire_optax/_src/selection.py.
//
// XLA:CPU runs a scatter-add (the 65,536-bin histogram of the selection) as a
// sequential loop of several ns per value, while an optimizer update costs about
// 1 ns per parameter; these two XLA FFI handlers compute the same histograms at
// about 1 ns per value. ire_optax compiles this file on first use (see native.py)
// and falls back to the XLA scatter when it cannot.
//
//   IreHistHigh(x f32[...]; square) -> u32[65536]: counts of the top 16 bits of the
//       keys of x (of x * x if `square`).
//   IreHistLow(x f32[...], high u32[]; square) -> u32[65536]: counts of the low 16
//       bits of the keys whose top 16 bits equal `high`.
//
// Keys are those of selection.ordered_keys: unsigned order = float order, -0.0
// and +0.0 tie, denormals tie with zero (XLA:CPU flushes them), NaN is largest.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
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

// The key of x, or of x * x when `Square` (the "grad_sq" curvature, without
// materialising it; a denormal square keys as zero, as XLA:CPU flushes it).
template <bool Square>
static inline uint32_t KeyOf(float x) {
  const float v = Square ? x * x : x;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return OrderedKey(bits);
}

constexpr size_t kBlock = 512;
constexpr size_t kBins = 65536;

// Adds the counts of the top 16 bits of the keys of d[0, n) to h.
template <bool Square>
static void HighRange(const float* d, size_t n, uint32_t* h) {
  uint32_t keys[kBlock];
  for (size_t s = 0; s < n; s += kBlock) {
    const size_t m = n - s < kBlock ? n - s : kBlock;
    for (size_t i = 0; i < m; ++i) keys[i] = KeyOf<Square>(d[s + i]) >> 16;
    for (size_t i = 0; i < m; ++i) h[keys[i]]++;
  }
}

// Adds the counts of the low 16 bits of the keys of d[0, n) in bucket `hi` to h.
template <bool Square>
static void LowRange(const float* d, size_t n, uint32_t hi, uint32_t* h) {
  // Blocks of 16: a vectorised test of the block, and a scalar pass only over the rare
  // blocks that hold a key of bucket `hi`.
  // The keys of a block are computed once, into a buffer the scalar pass reads.
  constexpr size_t kLanes = 16;
  uint32_t keys[kLanes];
  size_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    uint32_t any = 0;
    for (size_t i = 0; i < kLanes; ++i) {
      keys[i] = KeyOf<Square>(d[s + i]);
      any |= (keys[i] >> 16) == hi;
    }
    if (!any) continue;
    // Branch-free: a bucket holding a large share of the keys makes `match` random, and a
    // branch on it mispredicts (3x slower at a 50% share).
    for (size_t i = 0; i < kLanes; ++i) h[keys[i] & 0xFFFFu] += (keys[i] >> 16) == hi;
  }
  for (; s < n; ++s) {
    const uint32_t key = KeyOf<Square>(d[s]);
    if ((key >> 16) == hi) h[key & 0xFFFFu]++;
  }
}

// Runs count(d + begin, length, h_part) over up to hardware_concurrency() slices of
// at least kMinPerThread values, each into its own histogram, and sums them into h.
// (A thread and its 256 KiB histogram cost tens of microseconds: a slice of 2^18
// values takes several hundred.)
constexpr size_t kMinPerThread = size_t{1} << 18;

template <typename Count>
static void Histogram(const float* d, size_t n, uint32_t* h, Count count) {
  std::memset(h, 0, sizeof(uint32_t) * kBins);
  size_t threads = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), 8));
  threads = std::max<size_t>(1, std::min(threads, n / kMinPerThread));
  if (threads == 1) {
    count(d, n, h);
    return;
  }
  std::vector<std::vector<uint32_t>> parts(threads - 1, std::vector<uint32_t>(kBins, 0));
  std::vector<std::thread> pool;
  const size_t slice = (n + threads - 1) / threads;
  for (size_t t = 1; t < threads; ++t) {
    const size_t begin = t * slice, end = std::min(n, begin + slice);
    uint32_t* part = parts[t - 1].data();
    pool.emplace_back([=] { count(d + begin, end - begin, part); });
  }
  count(d, std::min(n, slice), h);
  for (auto& worker : pool) worker.join();
  for (const auto& part : parts)
    for (size_t b = 0; b < kBins; ++b) h[b] += part[b];
}

template <bool Square>
static void High(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::U32> hist) {
  Histogram(x.typed_data(), x.element_count(), hist->typed_data(),
            [](const float* d, size_t n, uint32_t* h) { HighRange<Square>(d, n, h); });
}

template <bool Square>
static void Low(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> high,
                ffi::ResultBuffer<ffi::U32> hist) {
  const uint32_t hi = high.typed_data()[0];
  Histogram(x.typed_data(), x.element_count(), hist->typed_data(),
            [hi](const float* d, size_t n, uint32_t* h) { LowRange<Square>(d, n, hi, h); });
}

static ffi::Error HighImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::U32> hist,
                           bool square) {
  square ? High<true>(x, hist) : High<false>(x, hist);
  return ffi::Error::Success();
}

static ffi::Error LowImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> high,
                          ffi::ResultBuffer<ffi::U32> hist, bool square) {
  square ? Low<true>(x, high, hist) : Low<false>(x, high, hist);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(IreHistHigh, HighImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::U32>>()
        .Attr<bool>("square"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(IreHistLow, LowImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::U32>>()
        .Ret<ffi::Buffer<ffi::U32>>().Attr<bool>("square"));
