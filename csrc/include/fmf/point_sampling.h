// Reading a map at one point (x, y) in [0, 1] as Mask2Former's point_sample does:
// F.grid_sample(map, 2 * point - 1, bilinear, padding_mode="zeros", align_corners=False), with the
// coordinate arithmetic of fmf/ms_deform_attn.h (the reference's fp32 operations, in its order).
//
// A point's taps are computed once per resolution and then serve every map of that size (all
// queries of an image, or all its targets), so the per-map work is four reads and four products.
#pragma once
#include <cstdint>

#include "fmf/ms_deform_attn.h"

namespace fmf {

// The four corners of a point in grid_sample's order (nw, ne, sw, se): offsets y * W + x into the
// map and bilinear weights. A corner outside the map has offset -1 and is never read, so a map's
// value there cannot turn zero padding into NaN.
struct PointTaps {
  int64_t off[4];
  float w[4];
};

FMF_HD PointTaps point_taps(float x, float y, int64_t H, int64_t W) {
  const Corners c = corners_at(x, y, H, W);
  PointTaps t;
  for (int k = 0; k < 4; ++k) {
    t.off[k] = c.valid[k] ? c.row(k, W) : -1;
    t.w[k] = c.weight(k);
  }
  return t;
}

// The map's value at the point, in fp32; Read(i) returns element i of the map as a float.
template <class Read>
FMF_HD float sample_at(const PointTaps& t, Read read) {
  float v = 0.f;
  for (int k = 0; k < 4; ++k) {
    if (t.off[k] >= 0) v += t.w[k] * read(t.off[k]);
  }
  return v;
}

}  // namespace fmf
