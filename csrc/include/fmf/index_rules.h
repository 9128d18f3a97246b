// Source-index rules of F.interpolate, shared by every kernel that resamples on the fly.
// They reproduce ATen's arithmetic exactly (float scale = in / out, as UpSample.h computes it when
// no scale_factor is given), so a kernel that reads at these indices matches F.interpolate bit for
// bit in where it samples.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FMF_HD __host__ __device__ __forceinline__
#else
#define FMF_HD inline
#endif

namespace fmf {

// mode="nearest": src = min(floor(dst * in / out), in - 1).
FMF_HD int64_t nearest_src(int64_t dst, int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in - 1 ? src : in - 1;
}

// mode="bilinear", align_corners=False, along one axis: the two taps and their weights.
struct LinearTap {
  int64_t i0, i1;
  float w0, w1;
};

FMF_HD LinearTap linear_src(int64_t dst, int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  const int64_t i0 = static_cast<int64_t>(src);
  const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
  const float w1 = src - static_cast<float>(i0);
  return {i0, i1, 1.f - w1, w1};
}

}  // namespace fmf
