// Native CPU kernels for the exact radix select of ire_optax/_src/selection.py.
//
// XLA:CPU runs a scatter-add (the 65,536-bin histogram of the selection) as a
// sequential loop of several ns per value, while an optimizer update costs about
// 1 ns per parameter; these XLA FFI handlers compute the same counts at about 1 ns
// per value. ire_optax compiles this file on first use (see native.py) and falls
// back to the XLA scatter when it cannot.
//
//   IreHistHigh(x f32[...]; square) -> u32[65536]: counts of the top 16 bits of the
//       keys of x (of x * x if `square`).
//   IreHistLow(x f32[...], high u32[]; square) -> u32[65536]: counts of the low 16
//       bits of the keys whose top 16 bits equal `high`.
//   IreSelect(rank u32[2], x_0 f32[...], x_1 f32[...], ...; square, chunk, margin)
//       -> (key u32[], [mask_0 u8[...], mask_1 u8[...], ...]): the key of the rank-th
//       smallest value (1-based, rank = lo + 2^32 hi, clipped into [1, N]) over all the
//       x_i and, if asked for, their masks 1[key(x) <= min(key, key(+inf))] -- the
//       whole selection of a tree on one device in one call: one pass over the values
//       when a sample brackets the rank (exact, verified by the counts), else the
//       two histogram passes. (The two histograms above serve selections whose counts
//       are summed across devices between the passes.)
//
// Keys are those of selection.ordered_keys: unsigned order = float order, -0.0
// and +0.0 tie, denormals tie with zero (XLA:CPU flushes them), NaN is largest.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
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

// 16 keys at a time with GCC/Clang vector extensions (AVX-512, AVX2 or SSE, as the
// target has); comparisons give 0 / -1 lanes.
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef float F32x16 __attribute__((vector_size(64)));

// KeyOf on 16 values.
template <bool Square>
static inline U32x16 KeysOf16(const float* d) {
  F32x16 v;
  std::memcpy(&v, d, sizeof(v));
  if (Square) v = v * v;
  U32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const U32x16 exp = bits & 0x7F800000u;
  const U32x16 flip = (0u - (bits >> 31)) | 0x80000000u;
  U32x16 key = bits ^ flip;
  const U32x16 zero = (U32x16)(exp == 0u);
  key = (key & ~zero) | (0x80000000u & zero);
  const U32x16 nan = (U32x16)((exp == 0x7F800000u) & ((bits & 0x007FFFFFu) != 0u));
  return key | nan;
}

// Whether any lane of a comparison result is true.
static inline bool AnyLane(I32x16 m) {
  uint64_t w[8];
  std::memcpy(w, &m, sizeof(w));
  return (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0;
}

// A key of the bucket the second pass resolves, and where its mask byte is.
struct Member {
  uint8_t* m;
  uint32_t key;
};

// Adds the counts of the low 16 bits of the keys of d[0, n) in bucket `hi` to h. With
// `Mask`, also writes the mask bytes it can already decide -- 1 below bucket `hi`, 0
// above -- and records the bucket's keys (while fewer than `cap`) in `members`, to
// decide theirs once the threshold is known.
template <bool Square, bool Mask = false>
static void LowRange(const float* d, size_t n, uint32_t hi, uint32_t* h,
                     uint8_t* m = nullptr, std::vector<Member>* members = nullptr,
                     size_t cap = 0) {
  // Groups of 64 values: a vectorised test of the group, and a scalar pass only over
  // the rare groups that hold a key of bucket `hi`.
  constexpr size_t kLanes = 16, kGroup = 4 * kLanes;
  typedef uint8_t U8x16 __attribute__((vector_size(16)));
  size_t s = 0;
  for (; s + kGroup <= n; s += kGroup) {
    U32x16 k[4];
    I32x16 match = {};
    for (size_t j = 0; j < 4; ++j) {
      k[j] = KeysOf16<Square>(d + s + j * kLanes);
      const U32x16 high = k[j] >> 16;
      if (Mask) {
        const U8x16 below = __builtin_convertvector((high < hi) & 1, U8x16);
        std::memcpy(m + s + j * kLanes, &below, sizeof(below));
      }
      match |= high == hi;
    }
    if (!AnyLane(match)) continue;
    // Branch-free: a bucket holding a large share of the keys makes a match random, and
    // a branch on it mispredicts (3x slower at a 50% share).
    for (size_t j = 0; j < 4; ++j) {
      for (size_t i = 0; i < kLanes; ++i) {
        const uint32_t key = k[j][i];
        const bool in = (key >> 16) == hi;
        h[key & 0xFFFFu] += in;
        if (Mask && in && members->size() < cap)
          members->push_back({m + s + j * kLanes + i, key});
      }
    }
  }
  for (; s < n; ++s) {
    const uint32_t key = KeyOf<Square>(d[s]);
    if (Mask) m[s] = (key >> 16) < hi;
    if ((key >> 16) == hi) {
      h[key & 0xFFFFu]++;
      if (Mask && members->size() < cap) members->push_back({m + s, key});
    }
  }
}

// A run of values (a leaf, or part of one) and, when the mask is asked for, its mask bytes.
struct Segment {
  const float* d;
  size_t n;
  uint8_t* m;  // nullptr: no mask
};

// The concatenation of `segs` (total `n` values) cut into `parts` contiguous slices.
static std::vector<std::vector<Segment>> SplitSegments(const std::vector<Segment>& segs,
                                                      size_t n, size_t parts) {
  std::vector<std::vector<Segment>> out(parts);
  const size_t per = (n + parts - 1) / parts;
  size_t part = 0, room = per;
  for (Segment s : segs) {
    while (s.n > 0) {
      const size_t take = std::min(s.n, room);
      out[part].push_back({s.d, take, s.m});
      s.d += take;
      if (s.m) s.m += take;
      s.n -= take;
      room -= take;
      if (room == 0 && part + 1 < parts) {
        ++part;
        room = per;
      }
    }
  }
  return out;
}

// Threads for n values, up to hardware_concurrency() (at most 8), one per `min_per_thread`.
static size_t NumThreads(size_t n, size_t min_per_thread) {
  const size_t hw = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), 8));
  return std::max<size_t>(1, std::min(hw, n / min_per_thread));
}

// Runs fn(t, slice_t) for every slice, slice 0 on the calling thread.
template <typename Fn>
static void ForEachSlice(const std::vector<std::vector<Segment>>& slices, Fn fn) {
  std::vector<std::thread> pool;
  for (size_t t = 1; t < slices.size(); ++t)
    pool.emplace_back([&fn, &slices, t] { fn(t, slices[t]); });
  fn(0, slices[0]);
  for (auto& worker : pool) worker.join();
}

// Runs count(d + begin, length, h_part) over slices of at least kMinPerThread values, each
// into its own histogram, and sums them into h. (A thread and its 256 KiB histogram cost
// tens of microseconds: a slice of 2^18 values takes several hundred.)
constexpr size_t kMinPerThread = size_t{1} << 18;

template <typename Count>
static void Histogram(const float* d, size_t n, uint32_t* h, Count count) {
  const auto slices = SplitSegments({{d, n, nullptr}}, n, NumThreads(n, kMinPerThread));
  std::memset(h, 0, sizeof(uint32_t) * kBins);
  std::vector<uint32_t> parts((slices.size() - 1) * kBins, 0);
  ForEachSlice(slices, [&](size_t t, const std::vector<Segment>& slice) {
    uint32_t* part = t == 0 ? h : parts.data() + (t - 1) * kBins;
    for (Segment s : slice) count(s.d, s.n, part);
  });
  for (size_t i = 0; i < parts.size(); ++i) h[i % kBins] += parts[i];
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

// -----------------------------------------------------------------------------
// IreSelect: the whole selection of a tree in one call
// -----------------------------------------------------------------------------
//
// From 2^18 values, first one pass bracketed by a sample (below). Otherwise, or when
// the bracket misses, the same two histogram passes over all the leaves of the tree
// (each thread one slice of their concatenation), the buckets found here between them,
// instead of a custom call per leaf and pass with XLA's bucket search in between; the
// second pass also writes the mask (no third pass over the values in the usual case).
// Counts are 64-bit: any N a CPU holds is exact.

// Threads for one whole-tree pass: fewer than for the per-leaf histograms. Inside a train
// step XLA's own threads run the optimizer's fusions beside this call, and below ~2^21
// values a second thread there costs more than it saves (measured at 1e6 values).
constexpr size_t kMinPerThreadTree = size_t{1} << 21;

// m[i] = key(d[i]) <= t: the mask when the bucket held too many keys to record.
template <bool Square>
static void MaskRange(const float* d, size_t n, uint32_t t, uint8_t* m) {
  constexpr size_t kLanes = 16;
  typedef uint8_t U8x16 __attribute__((vector_size(16)));
  size_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    const U8x16 v = __builtin_convertvector((KeysOf16<Square>(d + s) <= t) & 1, U8x16);
    std::memcpy(m + s, &v, sizeof(v));
  }
  for (; s < n; ++s) m[s] = KeyOf<Square>(d[s]) <= t;
}

// Every mask byte of every slice: m = key <= t.
template <bool Square>
static void RewriteMasks(const std::vector<std::vector<Segment>>& slices, uint32_t t) {
  ForEachSlice(slices, [&](size_t, const std::vector<Segment>& slice) {
    for (Segment s : slice) MaskRange<Square>(s.d, s.n, t, s.m);
  });
}

// -----------------------------------------------------------------------------
// One pass when a sample brackets the rank
// -----------------------------------------------------------------------------
//
// A stratified sample (one pseudo-random value in each of S equal strata of the
// concatenated values) is ranked; two sample keys lo <= hi bracket the target's rank
// with a margin of several standard deviations. One pass then counts the keys below
// lo, equal to lo and equal to hi, collects the keys strictly inside (lo, hi) (a few
// percent of N) and writes the mask bytes of everything but those. The counts say
// exactly where the rank-th key is: lo, hi or the (rank - below - at_lo)-th collected
// key. When they show that the bracket missed (a sample unlike the data) or more keys
// fell inside than the buffer holds, the caller runs the two histogram passes instead,
// which rewrite every mask byte. Either way the key is exact.

// splitmix64: the sample's position inside each stratum.
static inline uint64_t Mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct BracketPart {
  uint64_t below = 0, at_lo = 0, at_hi = 0, inside = 0;
  size_t kept = 0, cap = 0;  // keys in (lo, hi) collected, while they fit, ...
  std::unique_ptr<uint32_t[]> keys;
  std::unique_ptr<uint32_t[]> index;  // ... their offsets in their run, and the runs:
  std::vector<std::pair<uint8_t*, size_t>> runs;  // (mask bytes, first collected key)
};

// Counts the keys of d[0, n) (n < 2^32) below lo, equal to lo and to hi, collects those in
// (lo, hi) while they fit and, with a mask m, writes m = key <= lo (the collected keys'
// bytes are fixed up once the threshold is known).
template <bool Square>
static void BracketRange(const float* d, size_t n, uint32_t lo, uint32_t hi, uint8_t* m,
                         BracketPart& c) {
  constexpr size_t kLanes = 16;
  typedef uint8_t U8x16 __attribute__((vector_size(16)));
  if (m) c.runs.emplace_back(m, c.kept);
  // k in (lo, hi) <=> k - lo - 1 < width (unsigned); nothing is inside when lo == hi.
  const uint32_t width = hi > lo ? hi - lo - 1 : 0;
  U32x16 lane;
  for (size_t i = 0; i < kLanes; ++i) lane[i] = static_cast<uint32_t>(i);
  // Per-lane sums (true lanes are -1), flushed to 64 bits before they could wrap.
  constexpr size_t kFlush = size_t{1} << 28;
  size_t s = 0;
  while (s + kLanes <= n) {
    const size_t end = s + std::min((n - s) / kLanes * kLanes, kFlush);
    I32x16 below = {}, at_lo = {}, at_hi = {};
    for (; s < end; s += kLanes) {
      const U32x16 k = KeysOf16<Square>(d + s);
      below += k < lo;
      at_lo += k == lo;
      at_hi += k == hi;
      if (m) {
        const U8x16 v = __builtin_convertvector((k <= lo) & 1, U8x16);
        std::memcpy(m + s, &v, sizeof(v));
      }
      const I32x16 in = (k - lo - 1u) < width;
#if defined(__AVX512F__)
      // Compress in registers, store whole vectors (a compressing store to memory is
      // slow on some CPUs): no branch on the (random) lanes.
      __m512i kv, iv, inv;
      const U32x16 pos = lane + static_cast<uint32_t>(s);
      std::memcpy(&kv, &k, sizeof(kv));
      std::memcpy(&iv, &pos, sizeof(iv));
      std::memcpy(&inv, &in, sizeof(inv));
      const __mmask16 bits = _mm512_test_epi32_mask(inv, inv);
      const unsigned count = static_cast<unsigned>(__builtin_popcount(bits));
      c.inside += count;
      if (c.kept + kLanes > c.cap) continue;  // full: only counted from here on
      _mm512_storeu_si512(c.keys.get() + c.kept, _mm512_maskz_compress_epi32(bits, kv));
      _mm512_storeu_si512(c.index.get() + c.kept, _mm512_maskz_compress_epi32(bits, iv));
      c.kept += count;
#else
      if (!AnyLane(in)) continue;
      uint32_t bits = 0;
      for (size_t i = 0; i < kLanes; ++i) bits |= (static_cast<uint32_t>(in[i]) & 1u) << i;
      c.inside += static_cast<uint64_t>(__builtin_popcount(bits));
      if (c.kept + kLanes > c.cap) continue;  // full: only counted from here on
      for (; bits; bits &= bits - 1) {
        const int i = __builtin_ctz(bits);
        c.keys[c.kept] = k[i];
        c.index[c.kept] = static_cast<uint32_t>(s + i);
        ++c.kept;
      }
#endif
    }
    for (size_t i = 0; i < kLanes; ++i) {
      c.below += static_cast<uint32_t>(-below[i]);
      c.at_lo += static_cast<uint32_t>(-at_lo[i]);
      c.at_hi += static_cast<uint32_t>(-at_hi[i]);
    }
  }
  for (; s < n; ++s) {
    const uint32_t k = KeyOf<Square>(d[s]);
    c.below += k < lo;
    c.at_lo += k == lo;
    c.at_hi += k == hi;
    if (m) m[s] = k <= lo;
    if ((k - lo - 1u) < width) {
      ++c.inside;
      if (c.kept + kLanes <= c.cap) {
        c.keys[c.kept] = k;
        c.index[c.kept] = static_cast<uint32_t>(s);
        ++c.kept;
      }
    }
  }
}

// The 0-based r-th smallest of keys[0, n) (r < n), by a histogram of the top 16 bits and
// nth_element inside the bucket (which it moves to the front: the keys are reordered).
static uint32_t KthOfKeys(uint32_t* keys, size_t n, size_t r) {
  if (n <= 4096) {
    std::nth_element(keys, keys + r, keys + n);
    return keys[r];
  }
  std::vector<uint32_t> h(kBins, 0);
  for (size_t i = 0; i < n; ++i) h[keys[i] >> 16]++;
  uint32_t b = 0;
  for (; r >= h[b]; ++b) r -= h[b];
  size_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t k = keys[i];
    keys[m] = k;
    m += (k >> 16) == b;
  }
  std::nth_element(keys, keys + r, keys + m);
  return keys[r];
}

// Below this many values the two histogram passes run directly.
constexpr size_t kMinBracket = size_t{1} << 18;

// The bracketed selection; false when the bracket missed (nothing is decided then).
// `margin` is the bracket's half-width in the sample's standard deviations.
template <bool Square>
static bool SelectBracketed(const std::vector<Segment>& segs,
                            const std::vector<std::vector<Segment>>& slices, size_t n,
                            uint64_t rank, bool masks, double margin, uint32_t& key) {
  // 1. The sample and the bracket.
  const size_t S = std::min<size_t>(size_t{1} << 16, n / 64);
  std::vector<uint32_t> sample;
  sample.reserve(S);
  {
    const size_t stride = n / S;  // S strata of `stride` values (the last takes the rest)
    size_t seg = 0, seg_start = 0;  // the segment holding the current position
    for (size_t j = 0; j < S; ++j) {
      const uint64_t len = j + 1 < S ? stride : n - j * stride;
      const size_t pos = j * stride + static_cast<size_t>(((Mix(j) >> 32) * len) >> 32);
      while (pos >= seg_start + segs[seg].n) seg_start += segs[seg++].n;
      sample.push_back(KeyOf<Square>(segs[seg].d[pos - seg_start]));
    }
  }
  const double p = (static_cast<double>(rank) + 0.5) / static_cast<double>(n);
  const double sd = std::sqrt(static_cast<double>(S) * p * (1.0 - p));
  const double half = std::min(margin * sd + 16.0, static_cast<double>(S));
  const double centre = p * static_cast<double>(S);
  const size_t lo_i = centre > half ? static_cast<size_t>(centre - half) : 0;
  const size_t hi_i = std::min(S - 1, static_cast<size_t>(centre + half));
  // At an end of the sample the bracket extends to the smallest or largest key.
  std::vector<uint32_t> copy(sample);
  const uint32_t lo = lo_i == 0 ? 0u : KthOfKeys(copy.data(), S, lo_i);
  const uint32_t hi = hi_i == S - 1 ? 0xFFFFFFFFu : KthOfKeys(sample.data(), S, hi_i);
  // 2. The pass; each slice collects at most twice its expected share, plus some slack.
  const double expected = static_cast<double>(n) * static_cast<double>(hi_i - lo_i + 1) /
                          static_cast<double>(S);
  std::vector<BracketPart> parts(slices.size());
  ForEachSlice(slices, [&](size_t t, const std::vector<Segment>& slice) {
    size_t len = 0;
    for (Segment s : slice) len += s.n;
    BracketPart& c = parts[t];
    c.cap = std::min(len, static_cast<size_t>(2.0 * expected * static_cast<double>(len) /
                                              static_cast<double>(n))) + 1024;
    c.keys.reset(new uint32_t[c.cap]);
    c.index.reset(new uint32_t[c.cap]);
    // Runs of fewer than 2^32 values (the offsets are 32-bit).
    constexpr size_t kRun = size_t{1} << 31;
    for (Segment s : slice)
      for (size_t start = 0; start < s.n; start += kRun)
        BracketRange<Square>(s.d + start, std::min(s.n - start, kRun), lo, hi,
                             s.m ? s.m + start : nullptr, c);
  });
  uint64_t below = 0, at_lo = 0, at_hi = 0, inside = 0, kept = 0;
  for (const auto& c : parts) {
    below += c.below;
    at_lo += c.at_lo;
    at_hi += c.at_hi;
    inside += c.inside;
    kept += c.kept;
  }
  // 3. Where the rank-th key is.
  if (rank < below) return false;
  uint64_t r = rank - below;
  if (r < at_lo) {
    key = lo;
  } else {
    r -= at_lo;
    if (lo == hi) return false;
    if (r < inside) {
      if (kept < inside) return false;  // the buffer overflowed
      std::vector<uint32_t> keys;
      keys.reserve(kept);
      for (const auto& c : parts) keys.insert(keys.end(), c.keys.get(), c.keys.get() + c.kept);
      key = KthOfKeys(keys.data(), keys.size(), r);
    } else if (r - inside < at_hi) {
      key = hi;
    } else {
      return false;
    }
  }
  if (masks) {
    // The bytes hold key <= lo; the mask is key <= t. They agree on every key that was
    // not collected (<= lo, or >= hi) iff lo <= t and t is below those above lo.
    const uint32_t t = std::min(key, 0xFF800000u);  // NaN never selected
    const bool agree = lo <= t && (lo == hi ? t == lo : t < hi);
    if (agree && t == lo) {
      // the collected keys are above lo = t: their bytes (0) are right
    } else if (agree && kept == inside) {
      for (const auto& c : parts) {
        for (size_t j = 0; j < c.runs.size(); ++j) {
          uint8_t* m = c.runs[j].first;
          const size_t end = j + 1 < c.runs.size() ? c.runs[j + 1].second : c.kept;
          for (size_t i = c.runs[j].second; i < end; ++i) m[c.index[i]] = c.keys[i] <= t;
        }
      }
    } else {  // rare: a threshold at hi, or NaN in the bracket: rewrite every byte
      RewriteMasks<Square>(slices, t);
    }
  }
  return true;
}

// The key of the 0-based rank-th smallest value of all segments (n > rank values), by the
// two histogram passes, the buckets found here. With masks (every segment's m set), also
// writes m = 1[key <= min(that key, key of +inf)]: the selection's mask (NaN excluded).
// A thread's uint32 histogram counts at most `chunk` (<= 2^31) values between flushes to
// 64 bits (an attribute so that tests can reach the flushes with small trees). `margin`:
// the bracket's half-width in sample standard deviations (<= 0: no bracket).
template <bool Square>
static uint32_t SelectTree(const std::vector<Segment>& segs, size_t n, uint64_t rank,
                           bool masks, size_t chunk, double margin) {
  const size_t kChunk = chunk;
  const auto slices = SplitSegments(segs, n, NumThreads(n, kMinPerThreadTree));
  if (margin > 0 && n >= kMinBracket) {
    uint32_t key = 0;
    if (SelectBracketed<Square>(segs, slices, n, rank, masks, margin, key)) return key;
  }
  const size_t parts = slices.size();
  std::vector<uint32_t> hist(parts * kBins);
  std::vector<std::vector<uint64_t>> wide(parts);  // per thread, only past kChunk values
  auto pass = [&](auto count_one) {
    std::fill(hist.begin(), hist.end(), 0u);
    ForEachSlice(slices, [&](size_t t, const std::vector<Segment>& slice) {
      uint32_t* h = hist.data() + t * kBins;
      size_t since_flush = 0;
      for (Segment s : slice) {
        for (size_t start = 0; start < s.n; start += kChunk) {
          const size_t len = std::min(s.n - start, kChunk);
          if (since_flush + len > kChunk) {
            if (wide[t].empty()) wide[t].assign(kBins, 0);
            for (size_t b = 0; b < kBins; ++b) wide[t][b] += h[b], h[b] = 0;
            since_flush = 0;
          }
          count_one(t, s.d + start, len, s.m ? s.m + start : nullptr, h);
          since_flush += len;
        }
      }
    });
  };
  // The bucket holding the 0-based `r`, which becomes the rank inside it; `count` gets
  // the bucket's size. The threads' counts are merged first (vectorised), then rows of
  // 256 bins are skipped whole.
  std::vector<uint64_t> merged(kBins);
  auto find = [&](uint64_t& r, uint64_t& count) {
    for (size_t b = 0; b < kBins; ++b) merged[b] = hist[b];
    for (size_t t = 0; t < parts; ++t) {
      if (t > 0)
        for (size_t b = 0; b < kBins; ++b) merged[b] += hist[t * kBins + b];
      if (!wide[t].empty())
        for (size_t b = 0; b < kBins; ++b) merged[b] += wide[t][b], wide[t][b] = 0;
    }
    size_t row = 0;
    for (; row + 1 < kBins / 256; ++row) {
      uint64_t c = 0;
      for (size_t b = row * 256; b < row * 256 + 256; ++b) c += merged[b];
      if (r < c) break;
      r -= c;
    }
    size_t b = row * 256;
    for (; b + 1 < kBins && r >= merged[b]; ++b) r -= merged[b];
    count = merged[b];
    return static_cast<uint32_t>(b);
  };
  uint64_t r = rank, bucket = 0, unused = 0;
  pass([](size_t, const float* d, size_t len, uint8_t*, uint32_t* h) {
    HighRange<Square>(d, len, h);
  });
  const uint32_t high = find(r, bucket);
  if (!masks) {
    pass([high](size_t, const float* d, size_t len, uint8_t*, uint32_t* h) {
      LowRange<Square>(d, len, high, h);
    });
    return (high << 16) | find(r, unused);
  }
  // The bucket's keys are recorded up to a share of n (typical g^2 buckets hold far
  // less); a fuller bucket is decided by one more pass over all values.
  const size_t cap = static_cast<size_t>(std::min<uint64_t>(bucket, n / 8 + 4096));
  std::vector<std::vector<Member>> members(parts);
  for (auto& m : members) m.reserve(cap / parts + 64);
  pass([&](size_t t, const float* d, size_t len, uint8_t* m, uint32_t* h) {
    LowRange<Square, true>(d, len, high, h, m, &members[t], cap / parts + 64);
  });
  const uint32_t key = (high << 16) | find(r, unused);
  const uint32_t t = std::min(key, 0xFF800000u);  // NaN never selected
  size_t recorded = 0;
  for (const auto& m : members) recorded += m.size();
  if (recorded == bucket) {
    for (const auto& ms : members)
      for (const Member& m : ms) *m.m = m.key <= t;
  } else {
    RewriteMasks<Square>(slices, t);
  }
  return key;
}

// IreSelect(rank u32[2], x_0, ..., x_{L-1} f32; square) -> (key u32[], mask_0, ...,
// mask_{M-1} u8) with M = 0 (the key only) or M = L (each mask shaped like its x).
static ffi::Error SelectImpl(ffi::Buffer<ffi::U32> rank, ffi::RemainingArgs xs,
                             ffi::Result<ffi::Buffer<ffi::U32>> out, ffi::RemainingRets ms,
                             bool square, int64_t chunk, double margin) {
  if (chunk < 1 || chunk > (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("IreSelect: chunk must be in [1, 2^31]");
  const bool masks = ms.size() > 0;
  if (masks && ms.size() != xs.size())
    return ffi::Error::InvalidArgument("IreSelect: one mask per leaf, or none");
  std::vector<Segment> segs;
  size_t n = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    auto x = xs.get<ffi::Buffer<ffi::F32>>(i);
    if (x.has_error()) return x.error();
    uint8_t* m = nullptr;
    if (masks) {
      auto mask = ms.get<ffi::Buffer<ffi::U8>>(i);
      if (mask.has_error()) return mask.error();
      if ((*mask)->element_count() != x->element_count())
        return ffi::Error::InvalidArgument("IreSelect: a mask shaped unlike its leaf");
      m = (*mask)->typed_data();
    }
    if (x->element_count() > 0) {
      segs.push_back({x->typed_data(), x->element_count(), m});
      n += x->element_count();
    }
  }
  uint32_t key = 0;
  if (n > 0) {
    uint64_t r = static_cast<uint64_t>(rank.typed_data()[0]) |
                 (static_cast<uint64_t>(rank.typed_data()[1]) << 32);
    r = std::min<uint64_t>(std::max<uint64_t>(r, 1), n) - 1;  // 1-based, clipped; 0-based
    const size_t c = static_cast<size_t>(chunk);
    key = square ? SelectTree<true>(segs, n, r, masks, c, margin)
                 : SelectTree<false>(segs, n, r, masks, c, margin);
  }
  out->typed_data()[0] = key;
  return ffi::Error::Success();
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(IreSelect, SelectImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::U32>>().RemainingArgs()
        .Ret<ffi::Buffer<ffi::U32>>().RemainingRets().Attr<bool>("square")
        .Attr<int64_t>("chunk").Attr<double>("margin"));
