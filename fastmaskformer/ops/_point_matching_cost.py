"""``point_matching_cost``: Mask2Former's matching cost matrices for a whole batch, on sampled points.

For image b with N_b targets (labels l_j, masks t_j at the target size [H, W]), predictions (class
logits z_q, mask logits x_q at [h, w]) and the image's points c_b [P, 2] ((x, y) in [0, 1], shared by
all its queries and targets), both masks are read at the points bilinearly with zero padding
(``point_sample``: ``grid_sample(m, 2 * c - 1, align_corners=False)``), the targets at their own
resolution; with x_qp, t_jp those values and s = sigmoid(x):

    class[q, j] = -softmax(z_q)[l_j]
    bce[q, j]   = mean_p BCE(x_qp, t_jp)
    dice[q, j]  = 1 - (2 sum_p s_qp t_jp + 1) / (sum_p s_qp + sum_p t_jp + 1)
    C = cost_class * class + cost_mask * bce + cost_dice * dice          (float32, also under autocast)

Returns ``(cost, sizes)`` as ``matching_cost`` does: float32 [B, Q, Nmax] padded with +inf past N_b,
and int64 [B] (CPU). A cost that is not finite is NaN, which every solver rejects. The points are an
input (the matcher draws them), so a batched backend takes the same arguments and tests can fix them.

Nothing here reads a tensor's value on the host (the sizes come from shapes): a label outside
[0, K) makes its target's column NaN instead of raising, and the matcher, once the solver has
rejected the step, names the label. So the step keeps its single wait for the device.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..point_sampling import point_mask_cost, point_sample
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import Op
from ._matching_cost import _check as _check_matching_cost


@torch.no_grad()
def point_matching_cost_reference(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                                  tgt_labels: Sequence[torch.Tensor], tgt_masks: Sequence[torch.Tensor],
                                  coords: torch.Tensor, cost_class: float = 2.0, cost_mask: float = 5.0,
                                  cost_dice: float = 5.0) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Q, K1 = pred_logits.shape
    sizes: List[int] = [int(lab.shape[0]) for lab in tgt_labels]
    cost = torch.full((B, Q, max(sizes, default=0)), float("inf"), dtype=torch.float32, device=pred_logits.device)
    with torch.autocast(pred_logits.device.type, enabled=False):
        prob = pred_logits.float().softmax(-1)  # [B, Q, K+1]
        # Every query of image b at that image's points, one grid_sample for the batch: [B, Q, P].
        x = point_sample(pred_masks.float(), coords.float())
        for b, n in enumerate(sizes):
            if n == 0:
                continue
            labels = tgt_labels[b].long()
            valid = (labels >= 0) & (labels < K1 - 1)  # no host read: a bad label gives a NaN column
            c_class = torch.where(valid, -prob[b][:, labels.clamp(0, K1 - 2)], float("nan"))
            # The targets as channels of one map: [1, N, H, W] at the image's points -> [N, P].
            t = point_sample(tgt_masks[b][None].float(), coords[b:b + 1].float())[0]
            bce, dice = point_mask_cost(x[b], t)
            c = cost_class * c_class + cost_mask * bce + cost_dice * dice
            cost[b, :, :n] = torch.where(torch.isfinite(c), c, float("nan"))
    return cost, torch.tensor(sizes, dtype=torch.int64)


def _check(pred_logits, pred_masks, tgt_labels, tgt_masks, coords, cost_class=2.0, cost_mask=5.0, cost_dice=5.0,
           **_):
    _check_matching_cost(pred_logits, pred_masks, tgt_labels, tgt_masks, cost_class, cost_mask, cost_dice)
    check_tensor("coords", coords, 3, FLOAT_DTYPES)
    check_same_device(pred_logits=pred_logits, coords=coords)
    B = pred_logits.shape[0]
    if coords.shape[0] != B or coords.shape[2] != 2 or coords.shape[1] < 1:
        raise ValueError(f"coords: expected [B, P, 2] with B = {B} (one set of points per image) and P >= 1, "
                         f"got shape {tuple(coords.shape)}")
    if B and (0 in pred_masks.shape[-2:] or any(0 in m.shape[-2:] for m in tgt_masks)):
        raise ValueError(f"pred_masks/tgt_masks: empty spatial size {tuple(pred_masks.shape[-2:])}, "
                         f"{tuple(tgt_masks[0].shape[-2:])}")


point_matching_cost = Op("point_matching_cost", point_matching_cost_reference, check=_check)
