#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fmf/checks.h"
#include "fmf/index_rules.h"

namespace fmf {
namespace {

at::Tensor resize_nearest_cpu(const at::Tensor& masks, int64_t out_h, int64_t out_w) {
  FMF_CHECK_DIM(masks, 3);
  FMF_CHECK_DEVICE(masks, at::kCPU);
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0, "out_h, out_w: expected positive sizes, got ", out_h, ", ", out_w);
  const int64_t N = masks.size(0), H = masks.size(1), W = masks.size(2);
  auto out = at::empty({N, out_h, out_w}, masks.options());
  if (N == 0) return out;
  TORCH_CHECK_VALUE(H > 0 && W > 0, "masks: expected a non-empty spatial size, got ", masks.sizes());
  const auto in = masks.contiguous();
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, in.scalar_type(), "resize_nearest_cpu", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    std::vector<int64_t> xs(out_w);
    for (int64_t x = 0; x < out_w; ++x) xs[x] = nearest_src(x, W, out_w);
    at::parallel_for(0, N * out_h, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / out_h, y = r % out_h;
        const scalar_t* row = src + (n * H + nearest_src(y, H, out_h)) * W;
        scalar_t* o = dst + r * out_w;
        for (int64_t x = 0; x < out_w; ++x) o[x] = row[xs[x]];
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("resize_nearest", &fmf::resize_nearest_cpu);
}
