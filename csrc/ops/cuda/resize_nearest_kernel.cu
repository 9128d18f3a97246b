#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fmf/checks.h"
#include "fmf/index_rules.h"

namespace fmf {
namespace {

template <typename scalar_t>
__global__ void resize_nearest_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t total,
                                      int64_t H, int64_t W, int64_t out_h, int64_t out_w) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t x = i % out_w;
    const int64_t y = (i / out_w) % out_h;
    const int64_t n = i / (out_w * out_h);
    dst[i] = src[(n * H + nearest_src(y, H, out_h)) * W + nearest_src(x, W, out_w)];
  }
}

at::Tensor resize_nearest_cuda(const at::Tensor& masks, int64_t out_h, int64_t out_w) {
  FMF_CHECK_DIM(masks, 3);
  FMF_CHECK_DEVICE(masks, at::kCUDA);
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0, "out_h, out_w: expected positive sizes, got ", out_h, ", ", out_w);
  const c10::cuda::CUDAGuard guard(masks.device());
  const int64_t N = masks.size(0), H = masks.size(1), W = masks.size(2);
  auto out = at::empty({N, out_h, out_w}, masks.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  TORCH_CHECK_VALUE(H > 0 && W > 0, "masks: expected a non-empty spatial size, got ", masks.sizes());
  const auto in = masks.contiguous();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, in.scalar_type(), "resize_nearest_cuda", [&] {
    resize_nearest_kernel<scalar_t><<<blocks, threads, 0, stream>>>(in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                                      total, H, W, out_h, out_w);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CUDA, m) {
  m.impl("resize_nearest", &fmf::resize_nearest_cuda);
}
