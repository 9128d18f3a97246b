// Native point uncertainty on the CPU: -|x| of mask logits read bilinearly at candidate points.
//
// The criterion ranks 3 P uniform candidates per matched mask by this value and keeps the top
// 3/4 P (the uniform draws and the top-k stay in PyTorch). In plain PyTorch the ranking costs a
// 2 coords - 1 copy of the candidates, grid_sample over a gathered copy of the matched logits, and
// the abs and negation as two more [N, S] tensors; here the matched rows are read in place (row
// index[n] of the layer's logits) and the one [N, S] output is written once.
//
// Parallel over masks. fp32 maps with unit column stride on a CPU with AVX2 (the criterion's case):
// 8 points at a time, their taps in registers and their corners read by vector gathers. Otherwise
// chunks of fmf/point_chunk.h's kChunk points: their taps 8 at a time, then a scalar gather.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "fmf/checks.h"
#include "fmf/dtypes.h"
#include "fmf/point_chunk.h"
#include "fmf/row_index.h"

namespace fmf {
namespace {

using namespace point_chunk;

#ifdef FMF_AVX2_GATHER
// -|x| at the S points of xy on one fp32 h x w map with rows row_stride floats apart and unit column
// stride (gather_offsets_fit): each 8 points' taps in registers (no Taps arrays), and their four
// corners read with AVX2 gathers.
FMF_AVX2_GATHER_FN void uncertainty_gathered(const float* map, int32_t row_stride, const float* xy, int64_t S,
                                             int64_t h, int64_t w, float* out) {
  for (int64_t i = 0; i < S; i += kLanes) {
    f32x8 lx, ly;
    load_xy8(xy, i, S, lx, ly);
    const f32x8 v = bilinear8(taps8(lx, ly, h, w), row_stride,
                              [&](const simd::i32x8& offset) { return gather_f32(map, offset); });
    const f32x8 u = reinterpret_cast<f32x8>(reinterpret_cast<simd::i32x8>(v) | INT32_MIN);  // -|v|, as -fabs
    if (i + kLanes <= S) {
      simd::store(out + i, u);
    } else {
      for (int64_t j = 0; i + j < S; ++j) out[i + j] = u[j];
    }
  }
}
#endif

at::Tensor point_uncertainty_cpu(const at::Tensor& logits, const at::Tensor& coords,
                                 const std::optional<at::Tensor>& index) {
  FMF_CHECK_DIM(logits, 3);
  FMF_CHECK_DIM(coords, 3);
  FMF_CHECK_DEVICE(logits, at::kCPU);
  FMF_CHECK_SAME_DEVICE(coords, logits);
  check_float_dtype(logits.scalar_type(), "logits");
  check_float_dtype(coords.scalar_type(), "coords");
  const int64_t N = coords.size(0), S = coords.size(1), M = logits.size(0), h = logits.size(1), w = logits.size(2);
  TORCH_CHECK_VALUE(coords.size(2) == 2, "coords: expected [N, S, 2] ((x, y) points per mask), got shape ",
                    coords.sizes());
  const at::Tensor rows = check_row_index(index, "index", N, M, "logits");
  at::Tensor out = at::empty({N, S}, coords.options().dtype(at::kFloat));
  if (N == 0 || S == 0) return out;
  TORCH_CHECK_VALUE(h > 0 && w > 0, "logits: expected a non-empty mask size, got ", logits.sizes());
  const at::Tensor xy = coords.to(at::kFloat).contiguous();  // as the reference's coords.float()
  const int64_t* row = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  const int64_t s_n = logits.stride(0), s_h = logits.stride(1), s_w = logits.stride(2);
  float* dst = out.data_ptr<float>();
#ifdef FMF_AVX2_GATHER
  if (logits.scalar_type() == at::kFloat && s_w == 1 && avx2_gather_available() && gather_offsets_fit(h, s_h, w)) {
    const float* base = logits.const_data_ptr<float>();
    const float* points = xy.const_data_ptr<float>();
    constexpr int64_t kPart = 512;  // points per call, between prefetches of part of the next map
    const int64_t parts = (S + kPart - 1) / kPart;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float* map = base + (row ? row[n] : n) * s_n;
        const float* next = n + 1 < end ? base + (row ? row[n + 1] : n + 1) * s_n : nullptr;
        for (int64_t part = 0; part < parts; ++part) {
          if (next) prefetch_part(reinterpret_cast<const char*>(next), h, w * 4, s_h * 4, part, parts);
          const int64_t p0 = part * kPart;
          uncertainty_gathered(map, static_cast<int32_t>(s_h), points + (n * S + p0) * 2, std::min(kPart, S - p0), h,
                               w, dst + n * S + p0);
        }
      }
    });
    return out;
  }
#endif
  FMF_DISPATCH_FLOAT(logits.scalar_type(), "point_uncertainty_cpu", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Taps taps;
      float v[kChunk];
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* map = base + (row ? row[n] : n) * s_n;
        for (int64_t p0 = 0; p0 < S; p0 += kChunk) {
          const int64_t m = std::min(kChunk, S - p0);
          point_taps(xy.const_data_ptr<float>() + (n * S + p0) * 2, m, h, w, taps);
          gather(taps, m, [&](int64_t y, int64_t x) { return static_cast<float>(map[y * s_h + x * s_w]); }, v);
          float* o = dst + n * S + p0;
          for (int64_t i = 0; i < m; ++i) o[i] = -std::fabs(v[i]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) { m.impl("point_uncertainty", &fmf::point_uncertainty_cpu); }
