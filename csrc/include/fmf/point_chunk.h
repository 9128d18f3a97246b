// Bilinear reads of chunks of points on CPU maps, as Mask2Former's point_sample reads them
// (F.grid_sample on 2 coords - 1, bilinear, zero padding, align_corners=False): the taps of 8 points
// at a time in vector registers, then a gather of their values. Host code only (fmf/simd.h).
//
// Off-map corners are folded into zero weights at clamped, valid addresses, so the reads and the
// adds of the backward's scatter need no branch. (A zero-weight tap still reads its clamped
// address: a NaN logit next to the map's edge reaches the points beside it.)
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fmf/simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FMF_AVX2_GATHER 1
// A function whose loads of scattered points are AVX2 gathers (x86-64-v3: AVX2 and FMA), compiled
// without FMA contraction (see taps8); call it only where avx2_gather_available().
#define FMF_AVX2_GATHER_FN __attribute__((target("arch=x86-64-v3"), optimize("fp-contract=off")))
#endif

namespace fmf {
namespace point_chunk {

using simd::f32x8;
using simd::kLanes;

constexpr int64_t kChunk = 64;  // points per vector pass, a multiple of kLanes

// The 2 x 2 taps of a chunk's points on one map, as grid_sample reads them: clamped rows (ya, yb)
// and columns (xa, xb) of the corners, and their weights w[k] (corner k = 2 dy + dx), zero for a
// corner off the map, so reads and adds need no branch (a zero-weight tap reads or adds 0 at a
// clamped, valid address).
struct Taps {
  int32_t xa[kChunk], xb[kChunk], ya[kChunk], yb[kChunk];
  float w[4][kChunk];
};

// floor(v) for |v| < 2^31 (vector truncation, then one down where it rounded up).
inline f32x8 floor8(const f32x8& v) {
  const f32x8 f = __builtin_convertvector(__builtin_convertvector(v, simd::i32x8), f32x8);
  return f > v ? f - 1.f : f;
}

inline simd::i32x8 clamp8(const simd::i32x8& i, int32_t hi) { return i < 0 ? 0 : (i > hi ? hi : i); }

// The taps of 8 points (x in lx, y in ly) on an H x W map, in registers: corner k's weight w[k]
// (corner k = 2 dy + dx, zero off the map) and the clamped rows and columns. fmf/ms_deform_attn.h's
// corners_at: the reference's fp32 arithmetic on 2 coords - 1, the same cut-off far outside. Its
// callers compile without FMA contraction: a fused (g + 1) * W/2 - 1/2 can round a point on a pixel
// centre to the other side of it.
struct Taps8 {
  f32x8 w[4];
  simd::i32x8 xa, xb, ya, yb;
};

inline __attribute__((always_inline)) Taps8 taps8(const f32x8& lx, const f32x8& ly, int64_t H, int64_t W) {
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H), half_w = Wf * 0.5f, half_h = Hf * 0.5f;
  f32x8 x = ((2.f * lx - 1.f) + 1.f) * half_w - 0.5f, y = ((2.f * ly - 1.f) + 1.f) * half_h - 0.5f;
  const auto inside = (x > -2.f) & (y > -2.f) & (x < Wf + 1.f) & (y < Hf + 1.f);
  x = inside ? x : -2.f, y = inside ? y : -2.f;
  const f32x8 x0 = floor8(x), y0 = floor8(y), fx = x - x0, fy = y - y0;
  const simd::i32x8 cx = __builtin_convertvector(x0, simd::i32x8), cy = __builtin_convertvector(y0, simd::i32x8);
  const int32_t w1 = static_cast<int32_t>(W) - 1, h1 = static_cast<int32_t>(H) - 1;
  const auto vx0 = (cx >= 0) & (cx <= w1), vx1 = (cx >= -1) & (cx < w1);
  const auto vy0 = (cy >= 0) & (cy <= h1), vy1 = (cy >= -1) & (cy < h1);
  const f32x8 zero{};
  return {{(vx0 & vy0) ? (1.f - fx) * (1.f - fy) : zero, (vx1 & vy0) ? fx * (1.f - fy) : zero,
           (vx0 & vy1) ? (1.f - fx) * fy : zero, (vx1 & vy1) ? fx * fy : zero},
          clamp8(cx, w1),
          clamp8(cx + 1, w1),
          clamp8(cy, h1),
          clamp8(cy + 1, h1)};
}

// Points [i, i + 8) of xy ((x, y) pairs, m in all) as x and y vectors: two loads split by shuffles,
// or lane by lane at the tail (-1, far off the map, past m).
inline __attribute__((always_inline)) void load_xy8(const float* xy, int64_t i, int64_t m, f32x8& lx, f32x8& ly) {
  if (i + kLanes <= m) {
    const f32x8 a = simd::load(xy + 2 * i), b = simd::load(xy + 2 * i + kLanes);
    lx = __builtin_shuffle(a, b, simd::i32x8{0, 2, 4, 6, 8, 10, 12, 14});
    ly = __builtin_shuffle(a, b, simd::i32x8{1, 3, 5, 7, 9, 11, 13, 15});
  } else {
    for (int j = 0; j < kLanes; ++j) {
      const bool in = i + j < m;
      lx[j] = in ? xy[2 * (i + j)] : -1.f;
      ly[j] = in ? xy[2 * (i + j) + 1] : -1.f;
    }
  }
}

// Asks the cache for part `part` of `parts` of the rows of a map (prefetch_rows). The points read
// their maps in random order, so without this every first read of a line waits on memory; spread
// over the chunks of the mask before, the next mask's maps stream in while it computes.
inline void prefetch_part(const char* map, int64_t rows, int64_t row_bytes, int64_t row_stride, int64_t part,
                          int64_t parts, bool write = false) {
  prefetch_rows(map, row_bytes, row_stride, part * rows / parts, (part + 1) * rows / parts - 1, write);
}

#ifdef FMF_AVX2_GATHER
inline bool avx2_gather_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// Whether every element offset of a map of `rows` rows `row_stride` elements apart and `cols`
// columns (unit column stride), plus `slack`, fits the int32 lanes of a gather.
inline bool gather_offsets_fit(int64_t rows, int64_t row_stride, int64_t cols, int64_t slack = 0) {
  return (rows - 1) * row_stride + cols + slack <= std::numeric_limits<int32_t>::max();
}

// map[offset[j]] for fp32 elements.
FMF_AVX2_GATHER_FN inline __attribute__((always_inline)) f32x8 gather_f32(const float* map, const simd::i32x8& offset) {
  return reinterpret_cast<f32x8>(_mm256_i32gather_ps(map, reinterpret_cast<__m256i>(offset), 4));
}

// bytes[offset[j]] as floats (0 to 255), for byte elements. Each lane reads the aligned 4-byte word
// that holds its byte: a word never crosses a page, so no read can fault past the buffer's end.
FMF_AVX2_GATHER_FN inline __attribute__((always_inline)) f32x8 gather_u8(const uint8_t* bytes,
                                                                         const simd::i32x8& offset) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(bytes);
  const simd::i32x8 at = offset + static_cast<int32_t>(address & 3);  // from the word below bytes
  const int* words = reinterpret_cast<const int*>(address & ~uintptr_t{3});
  const simd::i32x8 word = reinterpret_cast<simd::i32x8>(
      _mm256_i32gather_epi32(words, reinterpret_cast<__m256i>(at & ~3), 1));
  return __builtin_convertvector((word >> ((at & 3) * 8)) & 0xFF, f32x8);
}

// The bilinear values of 8 points at their taps t on a map with rows row_stride elements apart and
// unit column stride, read(offset) reading 8 elements; the corners added in grid_sample's order.
template <class Read>
FMF_AVX2_GATHER_FN inline __attribute__((always_inline)) f32x8 bilinear8(const Taps8& t, int32_t row_stride,
                                                                          Read read) {
  const simd::i32x8 top = t.ya * row_stride, bottom = t.yb * row_stride;
  return t.w[0] * read(top + t.xa) + t.w[1] * read(top + t.xb) + t.w[2] * read(bottom + t.xa) +
         t.w[3] * read(bottom + t.xb);
}
#endif

// Points [i, i + 8) of taps from their registers.
inline __attribute__((always_inline)) void store_taps8(const Taps8& t, int64_t i, Taps& taps) {
  for (int k = 0; k < 4; ++k) simd::store(taps.w[k] + i, t.w[k]);
  std::memcpy(taps.xa + i, &t.xa, sizeof t.xa), std::memcpy(taps.xb + i, &t.xb, sizeof t.xb);
  std::memcpy(taps.ya + i, &t.ya, sizeof t.ya), std::memcpy(taps.yb + i, &t.yb, sizeof t.yb);
}

// Taps of points [0, m) of xy on an H x W map, 8 points at a time.
FMF_CPU_CLONES static __attribute__((optimize("fp-contract=off"))) void point_taps(const float* xy, int64_t m, int64_t H, int64_t W, Taps& taps) {
  for (int64_t i = 0; i < m; i += kLanes) {
    f32x8 lx, ly;
    load_xy8(xy, i, m, lx, ly);
    store_taps8(taps8(lx, ly, H, W), i, taps);
  }
}

// The bilinear values of points [0, m) at their taps on a map whose element (y, x) reads as
// read(y, x); zero past m.
template <class Read>
inline void gather(const Taps& taps, int64_t m, Read read, float* out) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t xa = taps.xa[i], xb = taps.xb[i], ya = taps.ya[i], yb = taps.yb[i];
    out[i] = taps.w[0][i] * read(ya, xa) + taps.w[1][i] * read(ya, xb) + taps.w[2][i] * read(yb, xa) +
             taps.w[3][i] * read(yb, xb);
  }
  std::fill(out + m, out + kChunk, 0.f);
}

}  // namespace point_chunk
}  // namespace fmf
