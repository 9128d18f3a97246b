// CPU vector loops (host code only): 8 float lanes as a GCC vector type.
//
// The compiler maps f32x8 to one AVX register in the x86-64-v3 clone of a function marked
// FMF_CPU_CLONES and to two SSE registers in its baseline clone; the loader picks the clone for the
// running CPU. Loops over f32x8 vectorize for certain, where auto-vectorization gives up on the
// selects and polynomial exp/log of fmf/focal_math.h. Buffers are padded to whole vectors.
#pragma once
#include <cstdint>
#include <cstring>

// Every f32x8 helper is inlined into its caller, so the ABI of passing one by value never matters
// (set before fmf/focal_math.h, whose templates are instantiated with f32x8).
#pragma GCC diagnostic ignored "-Wpsabi"

#include "fmf/focal_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FMF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// For loops over f32x16: one AVX-512 register in the x86-64-v4 clone, two AVX registers in the v3
// clone, four SSE registers in the baseline one.
#define FMF_CPU_CLONES_512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FMF_CPU_CLONES
#define FMF_CPU_CLONES_512
#endif

namespace fmf {
namespace simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <class V = f32x8>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
inline void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

inline float sum(const f32x8& v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// 1 in the lanes of the vector at element `start` whose index lies below n, else 0 (masks a tail).
inline f32x8 below(int64_t start, int64_t n) {
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int32_t left = static_cast<int32_t>(n - start < kLanes ? n - start : kLanes);
  return lane < left ? splat<f32x8>(1.f) : f32x8{};
}

// v[k][j] -> v[j][k]: an 8 x 8 tile transposed in registers (unpacks, then 2-lane and 4-lane shuffles).
inline void transpose8(f32x8 v[kLanes]) {
  const i32x8 lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
  const i32x8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const i32x8 lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  f32x8 t[kLanes], s[kLanes];
  for (int k = 0; k < kLanes; k += 2) {
    t[k] = __builtin_shuffle(v[k], v[k + 1], lo1);
    t[k + 1] = __builtin_shuffle(v[k], v[k + 1], hi1);
  }
  for (int k = 0; k < kLanes; k += 4) {  // s[k + c] holds columns c and c + 4 of rows k to k + 3
    s[k] = __builtin_shuffle(t[k], t[k + 2], lo2);
    s[k + 1] = __builtin_shuffle(t[k], t[k + 2], hi2);
    s[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], lo2);
    s[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], hi2);
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = __builtin_shuffle(s[c], s[c + 4], lo4);
    v[c + 4] = __builtin_shuffle(s[c], s[c + 4], hi4);
  }
}

}  // namespace simd

template <>
struct VecTraits<simd::f32x8> {
  using Int = simd::i32x8;
  static inline __attribute__((always_inline)) simd::f32x8 to_float(const Int& i) { return __builtin_convertvector(i, simd::f32x8); }
};

template <>
struct VecTraits<simd::f32x16> {
  using Int = simd::i32x16;
  static inline __attribute__((always_inline)) simd::f32x16 to_float(const Int& i) { return __builtin_convertvector(i, simd::f32x16); }
};

// Asks the cache for rows [first, last] (none when last < first) of a map whose rows hold
// row_bytes bytes, row_stride bytes apart, ahead of their reads (or writes, with `write`): reads at
// random points, or spread over many maps, give the hardware prefetcher no stride to follow.
inline void prefetch_rows(const char* map, int64_t row_bytes, int64_t row_stride, int64_t first, int64_t last,
                          bool write = false) {
  for (int64_t r = first; r <= last; ++r) {
    for (int64_t b = 0; b < row_bytes; b += 64) {
      if (write) {
        __builtin_prefetch(map + r * row_stride + b, 1);
      } else {
        __builtin_prefetch(map + r * row_stride + b);
      }
    }
  }
}

}  // namespace fmf
