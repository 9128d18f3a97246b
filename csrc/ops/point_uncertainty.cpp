// Schema of the native point uncertainty (Mask2Former's importance sampling): the official
// calculate_uncertainty of mask logits read at candidate points (fake kernel: fastmaskformer/_ext.py).
//
//   point_uncertainty(logits [M, h, w] float32/float16/bfloat16, coords [N, S, 2] float (x, y) in
//                     [0, 1], index [N]? int64/int32) -> float32 [N, S]:
//       -|x| with x row index[n] (or n) of logits read at point s of coords[n] as
//       F.grid_sample(bilinear, zeros padding, align_corners=False) reads 2 coords - 1.
//       No gradient: the criterion ranks points by it under no_grad.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def("point_uncertainty(Tensor logits, Tensor coords, Tensor? index=None) -> Tensor");
}
