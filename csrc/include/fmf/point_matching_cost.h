// What the CPU and CUDA point-matching-cost kernels share (host code): the argument checks and the
// inputs in the form both read. The predictions, labels and per-image targets go through
// prepare_matching_cost (fmf/matching_cost.h): the same checks and the same in-place table of target
// masks. Added here: the points, and the class probabilities.
#pragma once
#include <ATen/ATen.h>

#include "fmf/matching_cost.h"

namespace fmf {

struct PointMatchingCostInputs {
  MatchingCostInputs base;  // base.logits is unused: prob replaces it
  at::Tensor prob;          // float32 [B, Q, C], softmax of pred_logits (as small as the logits)
  at::Tensor coords;        // float32 [B, P, 2], contiguous
  int64_t P;
};

inline PointMatchingCostInputs prepare_point_matching_cost(const at::Tensor& pred_logits, const at::Tensor& pred_masks,
                                                          const at::Tensor& tgt_labels, at::TensorList tgt_masks,
                                                          const at::Tensor& coords, c10::DeviceType device) {
  PointMatchingCostInputs in{prepare_matching_cost(pred_logits, pred_masks, tgt_labels, tgt_masks, device)};
  FMF_CHECK_DIM(coords, 3);
  FMF_CHECK_SAME_DEVICE(coords, pred_logits);
  check_float_dtype(coords.scalar_type(), "coords");
  const int64_t B = pred_logits.size(0);
  TORCH_CHECK_VALUE(coords.size(0) == B && coords.size(1) >= 1 && coords.size(2) == 2,
                    "coords: expected [B, P, 2] with B = ", B, " (one set of points per image) and P >= 1, got shape ",
                    coords.sizes());
  in.P = coords.size(1);
  in.coords = coords.to(at::kFloat).contiguous();
  // The reference's softmax over the classes; the kernels read one entry per (query, target).
  in.prob = in.base.logits.softmax(-1);
  return in;
}

}  // namespace fmf
