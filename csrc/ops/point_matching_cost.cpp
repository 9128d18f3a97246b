// Schema of fastmaskformer::point_matching_cost: Mask2Former's matching cost matrices for a whole
// batch in one call, on sampled points (see fastmaskformer/ops/_point_matching_cost.py for the
// formulas).
//
//   pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w]: float32, float16 or bfloat16 (math in fp32);
//   tgt_labels  int64 [sum n_b]: every image's labels, concatenated in image order;
//   tgt_masks   B tensors [n_b, H, W] of one dtype (bool, uint8 or a float type), read in place at
//               their own resolution;
//   coords      [B, P, 2] (x, y) in [0, 1], float32, float16 or bfloat16: image b's points, shared by
//               its queries and targets; both masks are read there as F.grid_sample(bilinear, zeros
//               padding, align_corners=False) reads 2 coords - 1;
//   returns     float32 [B, Q, max n_b]: cost_class * -softmax[label] + cost_mask * mean BCE +
//               cost_dice * dice; +inf past n_b; NaN where not finite or the label is outside [0, K).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def(
      "point_matching_cost(Tensor pred_logits, Tensor pred_masks, Tensor tgt_labels, Tensor[] tgt_masks, "
      "Tensor coords, float cost_class, float cost_mask, float cost_dice) -> Tensor");
}
