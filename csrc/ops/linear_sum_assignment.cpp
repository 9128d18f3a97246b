// Schema of fastmaskformer::linear_sum_assignment: minimum-cost matchings of a whole batch in one
// call (rules in fmf/lap.h). cost is [B, Q, Nmax] (float16/bfloat16/float32/float64, any strides),
// image b using cost[b, :, :sizes[b]]; sizes is an int64 [B] tensor on the CPU. The result is an
// int64 [2, B * min(Q, Nmax)] tensor on cost's device: the (row, col) pairs of image 0, then image 1,
// ... (min(Q, sizes[b]) pairs each, rows ascending), then -1 padding. NaN, -inf or an infeasible
// image raises a ValueError naming the first such image.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def("linear_sum_assignment(Tensor cost, Tensor sizes) -> Tensor");
}
