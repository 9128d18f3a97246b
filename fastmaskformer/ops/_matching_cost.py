"""``matching_cost``: the Hungarian matcher's cost matrices for a whole batch.

For image b with N_b targets (labels l_j, binary masks t_j), and predictions (class logits z_q,
mask logits x_q at [h, w]), with targets nearest-downsampled to [h, w] (F.interpolate's "nearest"
index rule) and p = sigmoid(x), P = h * w:

    class[q, j] = -softmax(z_q)[l_j]
    focal[q, j] = (sum_p pos_qp t_jp + sum_p neg_qp (1 - t_jp)) / P
                  pos = alpha (1-p)^gamma BCE(x, 1),  neg = (1-alpha) p^gamma BCE(x, 0)
    dice[q, j]  = 1 - (2 sum_p p_qp t_jp + 1) / (sum_p p_qp + sum_p t_jp + 1)
    C = cost_class * class + cost_mask * focal + cost_dice * dice

Returns ``(cost, sizes)``: float32 [B, Q, Nmax] padded with +inf past N_b, and int64 [B] (CPU).
A cost that is not finite (predictions that are not) is NaN, which every solver rejects naming the
image. Labels must lie in [0, K); the reference and the CPU kernel raise otherwise, while the CUDA
kernel, which would need a host sync to say so, gives NaN in that target's column (the matcher
then names the bad label).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_finite_scalar, check_label_values, check_same_device, check_targets, \
    check_tensor
from ._dispatch import Op


def _focal_dice_cost(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float):
    """x: [Q, P] logits, t: [N, P] float targets -> focal [Q, N], dice [Q, N]."""
    P = x.shape[1]
    p = x.sigmoid()
    pos = (1 - p) ** gamma * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = p ** gamma * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    if alpha >= 0:
        pos, neg = alpha * pos, (1 - alpha) * neg
    focal = (pos @ t.T + neg @ (1 - t).T) / P
    dice = 1 - (2 * (p @ t.T) + 1) / (p.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return focal, dice


@torch.no_grad()
def matching_cost_reference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, tgt_labels: Sequence[torch.Tensor],
                            tgt_masks: Sequence[torch.Tensor], cost_class: float = 1.0, cost_mask: float = 1.0,
                            cost_dice: float = 1.0, alpha: float = 0.25,
                            gamma: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    check_label_values(tgt_labels, pred_logits.shape[-1] - 1)
    B, Q = pred_logits.shape[:2]
    sizes = torch.tensor([int(lab.shape[0]) for lab in tgt_labels], dtype=torch.int64)
    n_max = int(sizes.max()) if B else 0
    cost = torch.full((B, Q, n_max), float("inf"), dtype=torch.float32, device=pred_logits.device)
    for b in range(B):
        n = int(sizes[b])
        if n == 0:
            continue
        with torch.autocast(pred_logits.device.type, enabled=False):  # fp32 costs, as the official matchers
            prob = pred_logits[b].float().softmax(-1)
            c_class = -prob[:, tgt_labels[b].long()]
            t = F.interpolate(tgt_masks[b][:, None].float(), size=pred_masks.shape[-2:], mode="nearest")[:, 0]
            focal, dice = _focal_dice_cost(pred_masks[b].float().flatten(1), t.flatten(1), alpha, gamma)
            c = cost_class * c_class + cost_mask * focal + cost_dice * dice
        cost[b, :, :n] = torch.where(torch.isfinite(c), c, float("nan"))
    return cost, sizes


def _check(pred_logits, pred_masks, tgt_labels, tgt_masks, cost_class=1.0, cost_mask=1.0, cost_dice=1.0,
           alpha=0.25, gamma=2.0, **_):
    check_tensor("pred_logits", pred_logits, 3, FLOAT_DTYPES)
    check_tensor("pred_masks", pred_masks, 4, FLOAT_DTYPES)
    check_same_device(pred_logits=pred_logits, pred_masks=pred_masks)
    if pred_masks.shape[:2] != pred_logits.shape[:2]:
        raise ValueError(f"pred_masks: expected [B,Q] = {tuple(pred_logits.shape[:2])} like pred_logits, "
                         f"got shape {tuple(pred_masks.shape)}")
    check_targets(pred_logits, tgt_labels, tgt_masks)
    for name, v in (("cost_class", cost_class), ("cost_mask", cost_mask), ("cost_dice", cost_dice),
                    ("alpha", alpha), ("gamma", gamma)):
        check_finite_scalar(name, v)


matching_cost = Op("matching_cost", matching_cost_reference, check=_check)
