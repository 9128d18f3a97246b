"""The fused MaskFormer / Mask2Former loss inside Hugging Face transformers models.

``use_fused(model)`` replaces ``model.criterion`` of a ``MaskFormerForInstanceSegmentation`` or a
``Mask2FormerForUniversalSegmentation`` with :class:`FusedMaskFormerLoss`: the same forward signature
(mask logits, class logits, mask labels, class labels, auxiliary predictions) and the same loss dict
keys (``loss_mask``, ``loss_dice``, ``loss_cross_entropy``, and ``_i`` suffixed copies for the
auxiliary layers), computed by ``fastmaskformer.SetCriterion(fused=True)`` and
``HungarianMatcher(fused=True)``. The model's forward, its outputs, its loss weighting and any
training loop around it stay as they are.

transformers' semantics, which the fused criterion shares: ``mask_labels`` is a list of float
[N_i, H, W] masks (its image processor pads them to the batch's size; masks of different sizes are
zero-padded here before matching, as in the official MaskFormer and Mask2Former, where transformers'
matchers would use each unpadded), ``class_labels`` a list of int64 [N_i]; "no object" has the class
weight ``config.no_object_weight``; the losses are divided by the number of target masks (averaged
over processes, at least 1).

- MaskFormer: the matcher's class cost weight is 1 and its mask and dice weights are the config's;
  ``loss_mask`` is the sigmoid focal loss of the upsampled logits.
- Mask2Former: the matcher's weights are the config's class / mask / dice weights and it compares
  masks at ``train_num_points`` uniform random points per image (binary cross-entropy + dice);
  the losses sample ``train_num_points`` points per matched mask by importance (``oversample_ratio``
  x uniform candidates, the ``importance_sample_ratio`` most uncertain kept, the rest uniform).
  The points are drawn from the global RNG (or ``loss.criterion.generator``); transformers draws
  the same kinds of points in another order, so the two agree exactly only on the same points.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher

# fastmaskformer's loss names -> transformers'
_KEYS = {"loss_mask": "loss_mask", "loss_dice": "loss_dice", "loss_ce": "loss_cross_entropy"}


class FusedMaskFormerLoss(nn.Module):
    """A drop-in for transformers' ``MaskFormerLoss`` (``num_points=0``) or ``Mask2FormerLoss``
    (``num_points > 0``) on fastmaskformer's fused criterion.

    Args:
        num_labels: K, the number of classes (logits have K + 1 columns, the last "no object").
        weight_dict: kept as transformers keeps it (the model applies the weights).
        eos_coef: class weight of "no object".
        cost_class, cost_mask, cost_dice: the matcher's cost weights.
        num_points: 0 for MaskFormer's full-mask matching and losses; Mask2Former's
            ``train_num_points`` (12544) for its point-sampled ones.
        oversample_ratio, importance_sample_ratio: Mask2Former's importance sampling of the loss's
            points (3 and 0.75).
        fused: False runs fastmaskformer's reference path (for comparisons).
    """

    def __init__(self, num_labels: int, weight_dict: Dict[str, float], eos_coef: float, cost_class: float = 1.0,
                 cost_mask: float = 1.0, cost_dice: float = 1.0, fused: bool = True, num_points: int = 0,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_labels = num_labels
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.matcher = HungarianMatcher(cost_class=cost_class, cost_mask=cost_mask, cost_dice=cost_dice,
                                        num_points=num_points, fused=fused)
        self.criterion = SetCriterion(num_labels, self.matcher, {}, eos_coef, ("masks", "labels"),
                                      num_points=num_points, oversample_ratio=oversample_ratio,
                                      importance_sample_ratio=importance_sample_ratio, fused=fused)

    def forward(self, masks_queries_logits: torch.Tensor, class_queries_logits: torch.Tensor,
                mask_labels: List[torch.Tensor], class_labels: List[torch.Tensor],
                auxiliary_predictions: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
        if len(mask_labels) != len(class_labels) or len(mask_labels) != masks_queries_logits.shape[0]:
            raise ValueError(f"mask_labels, class_labels: expected one entry per image "
                             f"({masks_queries_logits.shape[0]}), got {len(mask_labels)} and {len(class_labels)}")
        outputs = {"pred_logits": class_queries_logits, "pred_masks": masks_queries_logits,
                   "aux_outputs": [{"pred_logits": a["class_queries_logits"], "pred_masks": a["masks_queries_logits"]}
                                   for a in auxiliary_predictions or ()]}
        losses = self.criterion(outputs, _targets(mask_labels, class_labels))
        return {_rename(key): value for key, value in losses.items()}


def _rename(key: str) -> str:
    """fastmaskformer's loss key -> transformers': "loss_ce_3" -> "loss_cross_entropy_3"."""
    for ours, theirs in _KEYS.items():
        if key == ours or key.startswith(ours + "_"):
            return theirs + key[len(ours):]
    raise KeyError(f"unexpected loss key {key!r}")


def _targets(mask_labels: List[torch.Tensor], class_labels: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """transformers' per-image labels as fastmaskformer targets, masks zero-padded to one size."""
    for i, m in enumerate(mask_labels):
        if m.dim() != 3:
            raise ValueError(f"mask_labels[{i}]: expected [N, H, W], got shape {tuple(m.shape)}")
    H = max(m.shape[-2] for m in mask_labels)
    W = max(m.shape[-1] for m in mask_labels)
    return [{"labels": c, "masks": m if m.shape[-2:] == (H, W) else F.pad(m, (0, W - m.shape[-1], 0, H - m.shape[-2]))}
            for m, c in zip(mask_labels, class_labels)]


def _fused_loss(loss: nn.Module, fused: bool) -> FusedMaskFormerLoss:
    """The fused counterpart of a transformers MaskFormerLoss or Mask2FormerLoss (or of a fused one)."""
    m = loss.matcher
    c = getattr(loss, "criterion", loss)  # a FusedMaskFormerLoss keeps the point settings on its criterion
    points = {}
    if getattr(c, "num_points", 0):  # Mask2Former's (its matcher samples as many points)
        points = dict(num_points=c.num_points, oversample_ratio=c.oversample_ratio,
                      importance_sample_ratio=c.importance_sample_ratio)
    return FusedMaskFormerLoss(loss.num_labels, loss.weight_dict, loss.eos_coef, m.cost_class, m.cost_mask,
                               m.cost_dice, fused=fused, **points)


def use_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Swap the loss of a transformers ``MaskFormerForInstanceSegmentation`` or
    ``Mask2FormerForUniversalSegmentation`` for fastmaskformer's fused criterion, in place; returns
    the model."""
    try:
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
        from transformers.models.maskformer.modeling_maskformer import MaskFormerLoss
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise ImportError("use_fused needs the transformers package") from exc
    loss = getattr(model, "criterion", None)
    if not isinstance(loss, (MaskFormerLoss, Mask2FormerLoss, FusedMaskFormerLoss)):
        raise TypeError(f"model: expected a transformers MaskFormerForInstanceSegmentation or "
                        f"Mask2FormerForUniversalSegmentation (whose criterion is a MaskFormerLoss or "
                        f"Mask2FormerLoss), got {type(model).__name__} with criterion {type(loss).__name__}")
    device = next(model.parameters()).device
    model.criterion = _fused_loss(loss, fused).to(device)
    return model
