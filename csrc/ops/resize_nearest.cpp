// Schema of fastmaskformer::resize_nearest: F.interpolate(mode="nearest") of a [N, H, W] stack of
// masks of any dtype, without the float round trip (bool/uint8 stay bytes). The smallest real op
// of _C; its index rule (fmf/index_rules.h) is the one the matching-cost kernels read targets with.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def("resize_nearest(Tensor masks, int out_h, int out_w) -> Tensor");
}
