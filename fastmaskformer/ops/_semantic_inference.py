"""``semantic_inference``: per-pixel class scores from query classes and masks.

scores[b, k, y, x] = sum_q softmax(pred_logits[b, q])[k] * sigmoid(up(pred_masks[b, q]))[y, x] for
k < K (the no-object column is dropped), where ``up`` is bilinear upsampling (align_corners=False)
to ``output_size``. With ``return_labels=True`` only the per-pixel argmax [B, H, W] is returned.
Fused backends never store the Q x H x W probabilities (nor, for labels, the K x H x W scores).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, MAX_GRID_YZ, check_same_device, check_tensor
from ._dispatch import Op


def semantic_inference_reference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, output_size: Sequence[int],
                                 return_labels: bool = False) -> torch.Tensor:
    cls = pred_logits.float().softmax(-1)[..., :-1]
    masks = F.interpolate(pred_masks.float(), size=tuple(output_size), mode="bilinear", align_corners=False).sigmoid()
    scores = torch.einsum("bqk,bqhw->bkhw", cls, masks)
    return scores.argmax(1) if return_labels else scores


def _check(pred_logits, pred_masks, output_size, return_labels=False, **_):
    check_tensor("pred_logits", pred_logits, 3, FLOAT_DTYPES)
    check_tensor("pred_masks", pred_masks, 4, FLOAT_DTYPES)
    check_same_device(pred_logits=pred_logits, pred_masks=pred_masks)
    if pred_masks.shape[:2] != pred_logits.shape[:2]:
        raise ValueError(f"pred_masks: expected [B,Q] = {tuple(pred_logits.shape[:2])} like pred_logits, "
                         f"got shape {tuple(pred_masks.shape)}")
    if pred_logits.shape[-1] < 2:
        raise ValueError(f"pred_logits: expected K+1 >= 2 classes (the last is no-object), got {pred_logits.shape[-1]}")
    if len(tuple(output_size)) != 2 or min(int(s) for s in output_size) <= 0:
        raise ValueError(f"output_size: expected (H, W) of positive ints, got {output_size}")


def _traits(pred_logits, pred_masks, *_, **__):
    """(needs a gradient, batch beyond a launch grid): fused backends are inference-only."""
    needs_grad = torch.is_grad_enabled() and (pred_logits.requires_grad or pred_masks.requires_grad)
    return needs_grad, pred_masks.shape[0] > MAX_GRID_YZ


semantic_inference = Op("semantic_inference", semantic_inference_reference, check=_check, traits=_traits)
