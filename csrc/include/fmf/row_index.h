// The optional row index of the ops that read matched rows in place (point_mask_loss,
// point_uncertainty): mask n reads row index[n] of a [rows, ...] tensor, or row n without an index.
// Host code: the checks read the index, which lives on the CPU for the CPU kernels.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "fmf/checks.h"

namespace fmf {

// Checks `index` (named `name`, int64 or int32 [N], on the CPU, every value in [0, rows)) against
// the `rows` rows of the tensor named `of`, and returns it as a contiguous int64 copy; without an
// index, checks rows == N and returns an undefined tensor. Out-of-range values raise IndexError.
inline at::Tensor check_row_index(const std::optional<at::Tensor>& index, const char* name, int64_t N, int64_t rows,
                                  const char* of) {
  if (!index.has_value()) {
    TORCH_CHECK_VALUE(rows == N, of, ": expected ", N, " masks (one per set of points) when ", name,
                      " is not given, got ", rows);
    return at::Tensor();
  }
  const at::Tensor& i = *index;
  TORCH_CHECK_VALUE(i.dim() == 1 && i.size(0) == N, name, ": expected shape [", N, "] (one row per set of points), got ",
                    i.sizes());
  TORCH_CHECK_TYPE(i.scalar_type() == at::kLong || i.scalar_type() == at::kInt, name,
                   ": expected dtype int64 or int32, got ", i.scalar_type());
  TORCH_CHECK_VALUE(i.device().type() == at::kCPU, name, ": expected a tensor on cpu, got one on ", i.device());
  at::Tensor rows_of = i.to(at::kLong).contiguous();
  const int64_t* r = rows_of.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_INDEX(r[n] >= 0 && r[n] < rows, name, "[", n, "] = ", r[n], " is out of range for the ", rows,
                      " rows of ", of);
  }
  return rows_of;
}

}  // namespace fmf
