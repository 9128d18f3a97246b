// Schema of the native point-sampled mask loss (Mask2Former's criterion): per-mask statistics of the
// logits and targets read at given points, and their backward as an op of its own (fake kernels and
// autograd: fastmaskformer/_ext.py).
//
//   point_mask_loss_forward(pred_masks [N, h, w] float32/float16/bfloat16, target_masks [N, H, W]
//                           bool, uint8 or float, coords [N, P, 2] float (x, y) in [0, 1],
//                           pred_index [N]?, target_index [N]? int64/int32)
//       -> float32 [N, 4]: per mask, with x the logits and t the targets each sampled at the points
//       as F.grid_sample(bilinear, zeros padding, align_corners=False) samples 2 coords - 1 (each map
//       at its own resolution), s = sigmoid(x): the sums over the P points of (BCE(x, t), s t, s, t),
//       the statistics contract of the mask losses (fastmaskformer/ops/_mask_loss.py's
//       losses_from_stats turns them into losses, with P in place of the pixel count). With
//       pred_index, mask n reads row pred_index[n] of pred_masks [M, h, w] (M rows, any number),
//       and with target_index row target_index[n] of target_masks [T, H, W]: the matched rows,
//       without a gathered copy.
//   point_mask_loss_backward(grad_stats [N, 4], pred_masks, target_masks, coords, pred_index?,
//       target_index?) -> d/d pred_masks (its shape, every row), in the dtype of pred_masks: each
//       point's gradient scattered into its 4 bilinear taps of its row. The
//       coordinates and targets get no gradient (the criterion draws the points without one).
//   point_mask_loss_backward_into(grad_stats, pred_masks, target_masks, coords, pred_index?,
//       target_index?, grad) -> (): the same gradient added into grad (float32, contiguous, the shape
//       of pred_masks), so a caller can zero the [M, h, w] buffer ahead of time (the criterion zeroes
//       it while the CPU draws the points one thread at a time). CPU only.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def(
      "point_mask_loss_forward(Tensor pred_masks, Tensor target_masks, Tensor coords, Tensor? pred_index=None, "
      "Tensor? target_index=None) -> Tensor");
  m.def(
      "point_mask_loss_backward(Tensor grad_stats, Tensor pred_masks, Tensor target_masks, Tensor coords, "
      "Tensor? pred_index=None, Tensor? target_index=None) -> Tensor");
  m.def(
      "point_mask_loss_backward_into(Tensor grad_stats, Tensor pred_masks, Tensor target_masks, Tensor coords, "
      "Tensor? pred_index, Tensor? target_index, Tensor(a!) grad) -> ()");
}
