// What the CPU and CUDA matching-cost kernels share (host code): the argument checks, and the table
// through which both read every image's target masks in place, at full resolution and in their own
// dtype: the batch's masks are never concatenated, converted or resized.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "fmf/checks.h"
#include "fmf/dtypes.h"

namespace fmf {

// One image's targets; int64-sized fields, so the table travels to the GPU as one int64 tensor.
struct ImageTargets {
  const void* masks;    // [n, H, W], contiguous
  int64_t n, H, W;
  int64_t first_label;  // where its labels start in the concatenated labels
};
static_assert(sizeof(ImageTargets) == 5 * sizeof(int64_t), "ImageTargets must pack into int64 slots");

struct MatchingCostInputs {
  at::Tensor logits;                // float32 [B, Q, C], contiguous (small: converted once)
  at::Tensor masks;                 // [B, Q, h, w] in the predictions' dtype, contiguous
  at::Tensor labels;                // int64 [sum n], contiguous
  std::vector<at::Tensor> targets;  // per image, contiguous (keeps any copy alive while in use)
  std::vector<ImageTargets> table;
  MaskKind kind;
  int64_t n_max;
  at::Tensor cost;                  // float32 [B, Q, n_max], +inf everywhere to start with
};

inline MatchingCostInputs prepare_matching_cost(const at::Tensor& pred_logits, const at::Tensor& pred_masks,
                                                const at::Tensor& tgt_labels, at::TensorList tgt_masks,
                                                c10::DeviceType device) {
  FMF_CHECK_DIM(pred_logits, 3);
  FMF_CHECK_DIM(pred_masks, 4);
  FMF_CHECK_DIM(tgt_labels, 1);
  FMF_CHECK_DEVICE(pred_logits, device);
  FMF_CHECK_SAME_DEVICE(pred_masks, pred_logits);
  FMF_CHECK_SAME_DEVICE(tgt_labels, pred_logits);
  check_float_dtype(pred_logits.scalar_type(), "pred_logits");
  check_float_dtype(pred_masks.scalar_type(), "pred_masks");
  TORCH_CHECK_TYPE(tgt_labels.scalar_type() == at::kLong, "tgt_labels: expected dtype int64, got ",
                   tgt_labels.scalar_type());
  const int64_t B = pred_logits.size(0), Q = pred_logits.size(1);
  TORCH_CHECK_VALUE(pred_masks.size(0) == B && pred_masks.size(1) == Q, "pred_masks: expected [B, Q] = [", B, ", ",
                    Q, "] like pred_logits, got shape ", pred_masks.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(tgt_masks.size()) == B, "tgt_masks: expected ", B,
                    " tensors (one per image), got ", tgt_masks.size());

  MatchingCostInputs in;
  in.kind = MaskKind::kByte;
  in.n_max = 0;
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& m = tgt_masks[b];
    TORCH_CHECK_VALUE(m.dim() == 3, "tgt_masks[", b, "]: expected a 3-d tensor [n, H, W], got shape ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == pred_logits.device(), "tgt_masks[", b, "] is on ", m.device(),
                      " but pred_logits is on ", pred_logits.device());
    const MaskKind kind = mask_kind(m.scalar_type(), "tgt_masks");
    TORCH_CHECK_TYPE(b == 0 || kind == in.kind, "tgt_masks[", b, "]: expected the dtype of tgt_masks[0], got ",
                     m.scalar_type());
    in.kind = kind;
    const int64_t n = m.size(0);
    TORCH_CHECK_VALUE(n == 0 || (m.size(1) > 0 && m.size(2) > 0), "tgt_masks[", b,
                      "]: expected a non-empty mask size, got shape ", m.sizes());
    in.targets.push_back(m.contiguous());
    in.table.push_back({in.targets.back().data_ptr(), n, m.size(1), m.size(2), total});
    total += n;
    in.n_max = std::max(in.n_max, n);
  }
  TORCH_CHECK_VALUE(tgt_labels.numel() == total, "tgt_labels: expected ", total,
                    " labels (the targets of all images, concatenated), got ", tgt_labels.numel());
  TORCH_CHECK_VALUE(total == 0 || (pred_masks.size(2) > 0 && pred_masks.size(3) > 0),
                    "pred_masks: expected a non-empty mask size, got shape ", pred_masks.sizes());
  TORCH_CHECK_VALUE(total == 0 || pred_logits.size(2) > 0, "pred_logits: expected at least one class, got shape ",
                    pred_logits.sizes());
  in.logits = pred_logits.to(at::kFloat).contiguous();
  in.masks = pred_masks.contiguous();
  in.labels = tgt_labels.contiguous();
  in.cost = at::full({B, Q, in.n_max}, std::numeric_limits<float>::infinity(),
                     pred_logits.options().dtype(at::kFloat));
  return in;
}

}  // namespace fmf
