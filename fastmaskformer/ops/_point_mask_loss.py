"""``point_mask_loss``: Mask2Former's mask losses of matched predictions on sampled points.

Mask n's logits x_n [h, w] and target t_n [H, W] (binary, any mask dtype) are read at its points
c_n [P, 2] ((x, y) in [0, 1]) bilinearly with zero padding (``grid_sample(m, 2 * c - 1,
align_corners=False)``), the target at its own resolution, so its samples are fractions where a point
falls between pixels of different value. With s = sigmoid(x):

    loss_mask = sum_n mean_p BCE(x_np, t_np) / num_masks
    loss_dice = sum_n [1 - (2 sum_p s_np t_np + 1) / (sum_p s_np + sum_p t_np + 1)] / num_masks

float32 scalars, also under autocast. The points are an input: the criterion draws them (importance
sampling, in PyTorch), so a fused backend that samples, reduces and scatters the gradient into the
[N, h, w] logits takes the same arguments, and tests can fix them. ``num_masks`` may be a 0-d device
tensor (averaged over ranks), which is never read on the host.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..point_sampling import point_mask_loss as _point_losses, point_sample
from ._checks import FLOAT_DTYPES, MASK_DTYPES, check_num_masks, check_same_device, check_tensor
from ._dispatch import Op


def point_mask_loss_reference(pred_masks: torch.Tensor, target_masks: torch.Tensor, coords: torch.Tensor,
                              num_masks) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(pred_masks.device.type, enabled=False):
        x = point_sample(pred_masks[:, None].float(), coords.float())[:, 0]  # [N, P], differentiable in the logits
        with torch.no_grad():
            t = point_sample(target_masks[:, None].float(), coords.float())[:, 0]
    # Divided by num_masks here, not inside, so that a device tensor is never read on the host.
    loss_mask, loss_dice = _point_losses(x, t, 1.0)
    return loss_mask / num_masks, loss_dice / num_masks


def _check(pred_masks, target_masks, coords, num_masks, **_):
    check_tensor("pred_masks", pred_masks, 3, FLOAT_DTYPES)
    check_tensor("target_masks", target_masks, 3, MASK_DTYPES)
    check_tensor("coords", coords, 3, FLOAT_DTYPES)
    check_same_device(pred_masks=pred_masks, target_masks=target_masks, coords=coords)
    N = pred_masks.shape[0]
    if target_masks.shape[0] != N:
        raise ValueError(f"target_masks: expected {N} masks (one per prediction), got shape "
                         f"{tuple(target_masks.shape)}")
    if coords.shape[0] != N or coords.shape[2] != 2 or coords.shape[1] < 1:
        raise ValueError(f"coords: expected [N, P, 2] with N = {N} (one set of points per mask) and P >= 1, got "
                         f"shape {tuple(coords.shape)}")
    if N and (0 in pred_masks.shape[-2:] or 0 in target_masks.shape[-2:]):
        raise ValueError(f"pred_masks/target_masks: empty spatial size {tuple(pred_masks.shape[-2:])}, "
                         f"{tuple(target_masks.shape[-2:])}")
    check_num_masks(num_masks)


point_mask_loss = Op("point_mask_loss", point_mask_loss_reference, check=_check)
