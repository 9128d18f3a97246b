// Native point uncertainty on the CPU: -|x| of mask logits read bilinearly at candidate points.
//
// The criterion ranks 3 P uniform candidates per matched mask by this value and keeps the top
// 3/4 P (the uniform draws and the top-k stay in PyTorch). In plain PyTorch the ranking costs a
// 2 coords - 1 copy of the candidates, grid_sample over a gathered copy of the matched logits, and
// the abs and negation as two more [N, S] tensors; here the matched rows are read in place (row
// index[n] of the layer's logits) and the one [N, S] output is written once.
//
// Parallel over masks, chunks of fmf/point_chunk.h's kChunk points: their taps 8 at a time, then the
// gather.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "fmf/checks.h"
#include "fmf/dtypes.h"
#include "fmf/point_chunk.h"
#include "fmf/row_index.h"

namespace fmf {
namespace {

using namespace point_chunk;

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
