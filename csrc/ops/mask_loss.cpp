// Schema of the native mask loss: per-mask statistics of the upsampled predictions, and their
// backward as an op of its own (fake kernels and autograd: fastmaskformer/_ext.py).
//
//   mask_loss_forward(pred_masks [N, h, w] float32/float16/bfloat16, target_masks [N, H, W] bool,
//                     uint8 or float) -> float32 [N, 4]: per mask, with x the logits upsampled
//       bilinearly (align_corners=False) to (H, W), s = sigmoid(x), t the target:
//       the sums over the H x W pixels of (sigmoid focal loss, s t, s, t): the one statistics
//       contract of every mask-loss backend (fastmaskformer/ops/_mask_loss.py turns them into losses).
//   mask_loss_backward(grad_stats [N, 4], pred_masks, target_masks) -> d/d pred_masks, in the
//       dtype of pred_masks, scattered straight into the low-resolution logits.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def("mask_loss_forward(Tensor pred_masks, Tensor target_masks, float alpha, float gamma) -> Tensor");
  m.def(
      "mask_loss_backward(Tensor grad_stats, Tensor pred_masks, Tensor target_masks, float alpha, float gamma) "
      "-> Tensor");
}
