// Schema of fastmaskformer::matching_cost: the Hungarian matcher's cost matrices for a whole batch in
// one call (see fastmaskformer/ops/matching_cost.py for the formulas).
//
//   pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w]: float32, float16 or bfloat16 (math in fp32);
//   tgt_labels  int64 [sum n_b]: every image's labels, concatenated in image order;
//   tgt_masks   B tensors [n_b, H, W] of one dtype (bool, uint8 or a float type), read in place and
//               nearest-downsampled to (h, w) by strided reads;
//   returns     float32 [B, Q, max n_b], +inf past n_b.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmaskformer, m) {
  m.def(
      "matching_cost(Tensor pred_logits, Tensor pred_masks, Tensor tgt_labels, Tensor[] tgt_masks, "
      "float cost_class, float cost_mask, float cost_dice, float alpha, float gamma) -> Tensor");
}
