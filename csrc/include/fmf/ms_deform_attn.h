// Where one sampling point of multi-scale deformable attention reads its level: F.grid_sample's rule
// (bilinear, padding_mode="zeros", align_corners=False) for a location in [0, 1] given as (x, y).
//
// The reference maps a location to the grid coordinate g = 2 loc - 1 and grid_sample maps g back to
// pixel units as (g + 1) * size / 2 - 0.5; the same fp32 operations in the same order here, so a
// point on a pixel centre lands on the same side of it (which decides d out / d loc there).
#pragma once
#include <cmath>
#include <cstdint>

#include "fmf/index_rules.h"  // FMF_HD

namespace fmf {

FMF_HD float grid_pixel(float loc, int64_t size) {
  const float g = 2.f * loc - 1.f;
  const float half_size = static_cast<float>(size) * 0.5f;
  return (g + 1.f) * half_size - 0.5f;
}

// The 2 x 2 corners around a point: corner k = 2 * dy + dx sits at (x0 + dx, y0 + dy); a corner
// outside the level has valid[k] == false and reads as zero (it still has its weight, for the
// gradient with respect to the location, as in grid_sample's backward).
struct Corners {
  int64_t x0, y0;
  float fx, fy;  // the point's offset from (x0, y0), in [0, 1)
  bool valid[4];

  FMF_HD float weight(int k) const {
    return (k & 1 ? fx : 1.f - fx) * (k & 2 ? fy : 1.f - fy);
  }
  // Row (y * W + x) of corner k within its level; only meaningful when valid[k].
  FMF_HD int64_t row(int k, int64_t W) const { return (y0 + (k >> 1)) * W + x0 + (k & 1); }
  FMF_HD bool any() const { return valid[0] || valid[1] || valid[2] || valid[3]; }
};

FMF_HD Corners corners_at(float loc_x, float loc_y, int64_t H, int64_t W) {
  const float x = grid_pixel(loc_x, W), y = grid_pixel(loc_y, H);
  Corners c;
  // Far outside (or NaN): no corner is read; clamp before the integer conversion stays defined.
  const bool inside = x > -2.f && y > -2.f && x < static_cast<float>(W) + 1.f && y < static_cast<float>(H) + 1.f;
  const float fx0 = inside ? floorf(x) : -2.f, fy0 = inside ? floorf(y) : -2.f;
  c.x0 = static_cast<int64_t>(fx0), c.y0 = static_cast<int64_t>(fy0);
  c.fx = inside ? x - fx0 : 0.f, c.fy = inside ? y - fy0 : 0.f;
  for (int k = 0; k < 4; ++k) {
    const int64_t cx = c.x0 + (k & 1), cy = c.y0 + (k >> 1);
    c.valid[k] = inside && cx >= 0 && cx < W && cy >= 0 && cy < H;
  }
  return c;
}

}  // namespace fmf
