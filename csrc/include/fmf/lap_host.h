// Host-side parts of the batched linear assignment op shared by its CPU and CUDA kernels: argument
// checks, where each image's pairs go in the packed output, and the error for a failed image.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "fmf/checks.h"
#include "fmf/lap.h"

namespace fmf {
namespace lap {

// Checks (cost, sizes) for a kernel on `device` and returns the packed output's offsets: image b's
// pairs are columns [offsets[b], offsets[b + 1]) of the [2, B * min(Q, Nmax)] result.
inline std::vector<int64_t> check_and_offsets(const at::Tensor& cost, const at::Tensor& sizes, at::DeviceType device) {
  FMF_CHECK_DIM(cost, 3);
  FMF_CHECK_DEVICE(cost, device);
  TORCH_CHECK_TYPE(at::isFloatingType(cost.scalar_type()),
                   "cost: expected float16, bfloat16, float32 or float64, got ", cost.scalar_type());
  FMF_CHECK_DIM(sizes, 1);
  FMF_CHECK_DEVICE(sizes, at::kCPU);
  TORCH_CHECK_TYPE(sizes.scalar_type() == at::kLong, "sizes: expected int64, got ", sizes.scalar_type());
  const int64_t B = cost.size(0), Q = cost.size(1), N = cost.size(2);
  TORCH_CHECK_VALUE(sizes.size(0) == B, "sizes: expected shape (", B, ",), got ", sizes.sizes());
  const auto s = sizes.contiguous();
  const int64_t* n = s.data_ptr<int64_t>();
  std::vector<int64_t> offsets(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] <= N, "sizes: expected values in [0, ", N, "], got ", n[b], " at image ", b);
    offsets[b + 1] = offsets[b] + std::min(Q, n[b]);
  }
  return offsets;
}

// Raises the ValueError of the first image (in batch order) whose status is not kOk.
inline void raise_first_error(const int32_t* status, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    switch (status[b]) {
      case kOk:
        continue;
      case kNaN:
        TORCH_CHECK_VALUE(false, "linear_sum_assignment: cost of image ", b, " contains NaN");
      case kNegInf:
        TORCH_CHECK_VALUE(false, "linear_sum_assignment: cost of image ", b, " contains -inf");
      case kInfeasible:
        TORCH_CHECK_VALUE(false, "linear_sum_assignment: image ", b,
                          " has no feasible matching (every complete matching uses a +inf entry)");
      default:
        TORCH_CHECK_VALUE(false, "linear_sum_assignment: the finite costs of image ", b,
                          " span too wide a range to stand in for +inf entries in float64");
    }
  }
}

}  // namespace lap
}  // namespace fmf
