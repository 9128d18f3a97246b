"""The fused MaskFormer loss inside Hugging Face transformers models.

``use_fused(model)`` replaces ``model.criterion`` of a ``MaskFormerForInstanceSegmentation`` with
:class:`FusedMaskFormerLoss`: the same forward signature (mask logits, class logits, mask labels,
class labels, auxiliary predictions) and the same loss dict keys (``loss_mask``, ``loss_dice``,
``loss_cross_entropy``, and ``_i`` suffixed copies for the auxiliary layers), computed by
``fastmaskformer.SetCriterion(fused=True)`` and ``HungarianMatcher(fused=True)``. The model's
forward, its outputs, its loss weighting and any training loop around it stay as they are.

transformers' semantics, which the fused criterion shares: ``mask_labels`` is a list of float
[N_i, H, W] masks (its image processor pads them to the batch's size; masks of different sizes are
zero-padded here before matching, as in the official MaskFormer, where transformers' matcher would
resize each unpadded), ``class_labels`` a list of int64 [N_i]; the matcher's class cost weight
is 1 and its mask and dice weights are the config's; "no object" has the class weight
``config.no_object_weight``; the losses are divided by the number of target masks (averaged over
processes, at least 1).
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
    """A drop-in for transformers' ``MaskFormerLoss`` on fastmaskformer's fused criterion.

    Args:
        num_labels: K, the number of classes (logits have K + 1 columns, the last "no object").
        weight_dict: kept as transformers keeps it (the model applies the weights).
        eos_coef: class weight of "no object".
        cost_class, cost_mask, cost_dice: the matcher's cost weights.
        fused: False runs fastmaskformer's reference path (for comparisons).
    """

    def __init__(self, num_labels: int, weight_dict: Dict[str, float], eos_coef: float, cost_class: float = 1.0,
                 cost_mask: float = 1.0, cost_dice: float = 1.0, fused: bool = True):
        super().__init__()
        self.num_labels = num_labels
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.matcher = HungarianMatcher(cost_class=cost_class, cost_mask=cost_mask, cost_dice=cost_dice, fused=fused)
        self.criterion = SetCriterion(num_labels, self.matcher, {}, eos_coef, ("masks", "labels"), fused=fused)

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


def use_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Swap the loss of a transformers ``MaskFormerForInstanceSegmentation`` for fastmaskformer's
    fused criterion, in place; returns the model."""
    try:
        from transformers.models.maskformer.modeling_maskformer import MaskFormerLoss
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise ImportError("use_fused needs the transformers package") from exc
    name = type(model).__name__
    if name == "Mask2FormerForUniversalSegmentation":
        raise NotImplementedError("model: Mask2Former's point-sampled loss has no fused fastmaskformer criterion yet; "
                                  "only MaskFormerForInstanceSegmentation is supported")
    loss = getattr(model, "criterion", None)
    if not isinstance(loss, (MaskFormerLoss, FusedMaskFormerLoss)):
        raise TypeError(f"model: expected a transformers MaskFormerForInstanceSegmentation (whose criterion is a "
                        f"MaskFormerLoss), got {name} with criterion {type(loss).__name__}")
    matcher = loss.matcher
    fused_loss = FusedMaskFormerLoss(loss.num_labels, loss.weight_dict, loss.eos_coef, matcher.cost_class,
                                     matcher.cost_mask, matcher.cost_dice, fused=fused)
    device = next(model.parameters()).device
    model.criterion = fused_loss.to(device)
    return model
