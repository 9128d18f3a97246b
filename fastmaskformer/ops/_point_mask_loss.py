"""``point_mask_loss``: Mask2Former's mask losses of matched predictions on sampled points.

Mask n's logits x_n [h, w] and target t_n [H, W] (binary, any mask dtype) are read at its points
c_n [P, 2] ((x, y) in [0, 1]) bilinearly with zero padding (``grid_sample(m, 2 * c - 1,
align_corners=False)``), the target at its own resolution, so its samples are fractions where a point
falls between pixels of different value. With s = sigmoid(x):

    loss_mask = sum_n mean_p BCE(x_np, t_np) / num_masks
    loss_dice = sum_n [1 - (2 sum_p s_np t_np + 1) / (sum_p s_np + sum_p t_np + 1)] / num_masks

float32 scalars, also under autocast. With ``pred_index`` / ``target_index`` ([N] int64 or int32),
mask n reads row ``pred_index[n]`` of ``pred_masks`` [M, h, w] and row ``target_index[n]`` of
``target_masks`` [T, H, W]: the criterion passes a layer's logits [B Q, h, w] and the step's targets
with the matched rows, so a fused backend gathers no copy of either and its backward writes the
layer's gradient (zero in unread rows) without an index_put. A row may be read twice. The points
are an input: the criterion draws them (importance sampling, in PyTorch), so a fused backend that
samples, reduces and scatters the gradient into the [N, h, w] logits takes the same arguments, and
tests can fix them. ``num_masks`` may be a 0-d device
tensor (averaged over ranks), which is never read on the host.

``groups`` (host ints summing to N) sums consecutive runs of masks separately: the losses are then
float32 [len(groups)] vectors. The criterion passes every decoder layer's matched masks in one call,
one group per layer, when the layers' logits are slices of one tensor (as this package's heads make
them): the backward then writes the gradient of that whole tensor once, where L calls would each
write a layer's gradient that autograd then stacks.

``grad_out`` (a contiguous tensor of ``pred_masks``' shape and dtype): the backward adds the
gradient of ``pred_masks`` into it and passes it on as that gradient, instead of allocating one; with
zeros in it, it is the gradient. The native CPU backend (float32) scatters straight into it, the
others add theirs. So a caller can zero the buffer ahead of time: the criterion zeroes the [M, h, w]
buffer of every layer's logits on a second thread while the first draws the points (the CPU
generator draws on one thread), where the backward would otherwise zero 524 MB of fresh pages first
at B=8 (0.09 s of a 0.72 s step in torch.profiler on a 2-core AMD VM; whether the overlap gains it
back depends on the machine: see benchmarks/results/mask2former_loss_cpu.md).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..point_sampling import point_mask_loss as _point_losses, point_sample
from ._checks import (FLOAT_DTYPES, MASK_DTYPES, check_groups, check_num_masks, check_row_index, check_same_device,
                      check_tensor)
from ._dispatch import Op


class _AddGradInto(torch.autograd.Function):
    """The identity on x, whose backward adds the incoming gradient into ``grad_out`` and passes
    ``grad_out`` on as x's gradient."""

    @staticmethod
    def forward(ctx, x, grad_out):
        ctx.grad_out = grad_out
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.grad_out.add_(grad), None


def add_grad_into(pred_masks: torch.Tensor, grad_out: Optional[torch.Tensor]) -> torch.Tensor:
    """pred_masks, whose gradient (if it needs one) is added into ``grad_out`` when one is given: the
    ``grad_out`` contract for backends that compute the gradient themselves."""
    if grad_out is None or not pred_masks.requires_grad:
        return pred_masks
    return _AddGradInto.apply(pred_masks, grad_out)


def point_mask_loss_reference(pred_masks: torch.Tensor, target_masks: torch.Tensor, coords: torch.Tensor,
                              num_masks, pred_index: Optional[torch.Tensor] = None,
                              target_index: Optional[torch.Tensor] = None,
                              groups: Optional[Sequence[int]] = None,
                              grad_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    pred_masks = add_grad_into(pred_masks, grad_out)
    if pred_index is not None:
        pred_masks = pred_masks[pred_index]
    if target_index is not None:
        target_masks = target_masks[target_index]
    with torch.autocast(pred_masks.device.type, enabled=False):
        x = point_sample(pred_masks[:, None].float(), coords.float())[:, 0]  # [N, P], differentiable in the logits
        with torch.no_grad():
            t = point_sample(target_masks[:, None].float(), coords.float())[:, 0]
    # Divided by num_masks here, not inside, so that a device tensor is never read on the host.
    if groups is not None:
        parts = [_point_losses(xg, tg, 1.0) for xg, tg in zip(x.split(list(groups)), t.split(list(groups)))]
        if not parts:
            return x.new_zeros(0), x.new_zeros(0)
        return torch.stack([m for m, _ in parts]) / num_masks, torch.stack([d for _, d in parts]) / num_masks
    loss_mask, loss_dice = _point_losses(x, t, 1.0)
    return loss_mask / num_masks, loss_dice / num_masks


def _check(pred_masks, target_masks, coords, num_masks, pred_index=None, target_index=None, groups=None,
           grad_out=None, **_):
    check_tensor("pred_masks", pred_masks, 3, FLOAT_DTYPES)
    check_tensor("target_masks", target_masks, 3, MASK_DTYPES)
    check_tensor("coords", coords, 3, FLOAT_DTYPES)
    check_same_device(pred_masks=pred_masks, target_masks=target_masks, coords=coords)
    N = pred_masks.shape[0] if pred_index is None else check_row_index("pred_index", pred_index, coords)
    if target_index is None:
        if target_masks.shape[0] != N:
            raise ValueError(f"target_masks: expected {N} masks (one per prediction), got shape "
                             f"{tuple(target_masks.shape)}")
    elif check_row_index("target_index", target_index, coords) != N:
        raise ValueError(f"target_index: expected shape [{N}] (one row per prediction), got "
                         f"{tuple(target_index.shape)}")
    if coords.shape[0] != N or coords.shape[2] != 2 or coords.shape[1] < 1:
        raise ValueError(f"coords: expected [N, P, 2] with N = {N} (one set of points per mask) and P >= 1, got "
                         f"shape {tuple(coords.shape)}")
    if N and (0 in pred_masks.shape[-2:] or 0 in target_masks.shape[-2:]):
        raise ValueError(f"pred_masks/target_masks: empty spatial size {tuple(pred_masks.shape[-2:])}, "
                         f"{tuple(target_masks.shape[-2:])}")
    check_num_masks(num_masks)
    check_groups(groups, N)
    if grad_out is not None:
        check_tensor("grad_out", grad_out, 3, (pred_masks.dtype,))
        check_same_device(pred_masks=pred_masks, grad_out=grad_out)
        if grad_out.shape != pred_masks.shape or not grad_out.is_contiguous():
            raise ValueError(f"grad_out: expected a contiguous tensor of pred_masks' shape {tuple(pred_masks.shape)}, "
                             f"got shape {tuple(grad_out.shape)}"
                             f"{'' if grad_out.is_contiguous() else ' (not contiguous)'}")


point_mask_loss = Op("point_mask_loss", point_mask_loss_reference, check=_check)
