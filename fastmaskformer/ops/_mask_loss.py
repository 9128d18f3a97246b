"""``mask_loss``: sigmoid focal loss and dice loss of matched mask logits against their targets.

The predictions are low-resolution logits [N, h, w]; the targets are [N, H, W] binary masks. The
reference upsamples the logits bilinearly (align_corners=False) to (H, W) and evaluates the losses
there, exactly as the official MaskFormer criterion does. Fused backends compute the same thing
without ever writing the N x H x W upsampled tensor.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, MASK_DTYPES, check_finite_scalar, check_num_masks, check_same_device, check_tensor
from ._dispatch import Op


def mask_loss_reference(pred_masks: torch.Tensor, target_masks: torch.Tensor, num_masks: float,
                        alpha: float = 0.25, gamma: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss_mask, loss_dice)``, float32 scalars, both divided by ``num_masks``.

    loss_mask = sum_i mean_p FL(x_ip, t_ip) / num_masks, FL the sigmoid focal loss
        FL = alpha_t * (1 - p_t)^gamma * BCE(x, t),  p_t = p t + (1-p)(1-t),
        alpha_t = alpha t + (1-alpha)(1-t)  (alpha < 0 disables the weighting);
    loss_dice = sum_i [1 - (2 sum_p s_ip t_ip + 1) / (sum_p s_ip + sum_p t_ip + 1)] / num_masks,
    with x the logits upsampled to the target size and s = sigmoid(x).
    """
    if pred_masks.shape[0] == 0:
        zero = pred_masks.float().sum() * 0.0  # keeps the graph so backward() works on empty batches
        return zero, zero.clone()
    x = F.interpolate(pred_masks[:, None].float(), size=target_masks.shape[-2:], mode="bilinear",
                      align_corners=False)[:, 0].flatten(1)
    t = target_masks.flatten(1).float()
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        focal = (alpha * t + (1 - alpha) * (1 - t)) * focal
    loss_mask = focal.mean(1).sum() / num_masks
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    loss_dice = dice.sum() / num_masks
    return loss_mask, loss_dice


def losses_from_stats(stats: torch.Tensor, num_masks, pixels: int, groups: Optional[Sequence[int]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss_mask, loss_dice) from the per-mask statistics that every fused backend reduces to.

    The one contract: ``stats`` is float32 [N, 4] whose row n holds, over the ``pixels`` = H x W
    pixels of mask n, the sums of (focal loss, s t, s, t), s the sigmoid of the upsampled logits and
    t the target. Differentiable in ``stats``: a backend's backward receives d/d(stats). With
    ``groups`` (counts of consecutive masks, host ints summing to N) the losses are [len(groups)]
    vectors, one sum per group (:func:`group_sums`).
    """
    dice = 1 - (2 * stats[:, 1] + 1) / (stats[:, 2] + stats[:, 3] + 1)
    if groups is not None:
        return group_sums(stats[:, 0], groups) / pixels / num_masks, group_sums(dice, groups) / num_masks
    return stats[:, 0].sum() / pixels / num_masks, dice.sum() / num_masks


def group_sums(values: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """[N] -> [len(groups)]: the sums of consecutive runs of ``groups[g]`` values, each summed in
    order (deterministic, no atomics)."""
    if not groups:
        return values.new_zeros(0)
    return torch.stack([part.sum() for part in values.split(list(groups))])


def _check(pred_masks, target_masks, num_masks, alpha=0.25, gamma=2.0, **_):
    check_tensor("pred_masks", pred_masks, 3, FLOAT_DTYPES)
    check_tensor("target_masks", target_masks, 3, MASK_DTYPES)
    check_same_device(pred_masks=pred_masks, target_masks=target_masks)
    if target_masks.shape[0] != pred_masks.shape[0]:
        raise ValueError(f"target_masks: expected {pred_masks.shape[0]} masks (one per prediction), "
                         f"got shape {tuple(target_masks.shape)}")
    h, w = pred_masks.shape[-2:]
    H, W = target_masks.shape[-2:]
    if pred_masks.shape[0] and (h == 0 or w == 0 or H == 0 or W == 0):
        raise ValueError(f"pred_masks/target_masks: empty spatial size {(h, w)} -> {(H, W)}")
    if H < h or W < w:
        raise ValueError(f"target_masks: expected a size at least the prediction's {(h, w)}, got {(H, W)}")
    check_num_masks(num_masks)
    check_finite_scalar("alpha", alpha)
    check_finite_scalar("gamma", gamma)
    if float(gamma) < 0:
        raise ValueError(f"gamma: expected >= 0, got {gamma}")


mask_loss = Op("mask_loss", mask_loss_reference, check=_check)
