// Schema of the native mask loss: per-mask statistics of the upsampled predictions, and their
// backward as an op of its own (autograd glue: fastmaskformer/ops/backends/native.py).
//
//   mask_loss_forward(pred_masks [N, h, w] float32/float16/bfloat16, target_masks [N, H, W] bool,
//                     uint8 or float) -> float32 [N, 4]: per mask, with x the logits upsampled
//       bilinearly (align_corners=False) to (H, W), s = sigmoid(x), t the target:
//       (mean over pixels of the sigmoid focal loss, sum s t, sum s, sum t).
//       loss_mask and loss_dice are then sums over these rows (see mask_loss.py).
//   mask_loss_backward(grad_stats [N, 4], pred_masks, target_masks) -> d/d pred_masks, in the
//       dtype of pred_masks, scattered straight into the low-resolution logits.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def("mask_loss_forward(Tensor pred_masks, Tensor target_masks, float alpha, float gamma) -> Tensor");
  m.def(
      "mask_loss_backward(Tensor grad_stats, Tensor pred_masks, Tensor target_masks, float alpha, float gamma) "
      "-> Tensor");
}
