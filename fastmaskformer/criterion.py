"""MaskFormer's set criterion: match, then classification and mask losses on every decoder layer.

Semantics follow the official MaskFormer ``SetCriterion``: ``loss_ce`` is the cross-entropy over
all queries (unmatched queries labelled "no object" = K, whose class weight is ``eos_coef``);
``loss_mask`` (sigmoid focal) and ``loss_dice`` compare matched mask logits, upsampled to the
target size, with their targets, summed over masks and divided by ``num_masks`` (the total number
of targets, averaged over distributed ranks, at least 1). Auxiliary outputs get the same losses
with suffix ``_i``. Losses are returned unweighted; the model applies ``weight_dict``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ops
from .matcher import HungarianMatcher, Indices, check_outputs, split_targets


def average_num_masks(targets: Sequence[Dict], device: torch.device) -> float:
    """Total targets in the batch, summed over ranks and divided by the world size, clamped >= 1."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return float(torch.clamp(n / world, min=1).item())


def _flat_indices(indices: Indices, device: torch.device):
    """(batch index, prediction index, target index) of every matched pair, concatenated on
    ``device``. The indices stay where the solver left them until one copy each: no per-image
    transfer (a per-image sync when the solver ran on the GPU)."""
    if not indices:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, empty
    counts = torch.tensor([len(src) for src, _ in indices], dtype=torch.int64)  # shapes: host metadata
    batch = torch.repeat_interleave(torch.arange(len(indices)), counts).to(device)
    src = torch.cat([s for s, _ in indices]).to(device)
    tgt = torch.cat([t for _, t in indices]).to(device)
    return batch, src, tgt


class SetCriterion(nn.Module):
    """The MaskFormer loss.

    Args:
        num_classes: K, the number of real classes (logits have K+1 columns, the last "no object").
        matcher: the :class:`HungarianMatcher` pairing predictions with targets.
        weight_dict: loss name -> weight; kept for the model (this module returns unweighted losses).
        eos_coef: class weight of "no object" in the cross-entropy (0.1 in MaskFormer).
        losses: which losses to compute: any of "labels" (loss_ce) and "masks" (loss_mask, loss_dice).
        fused: use fused backends for the mask loss (and the matcher's own flag for matching).
        focal_alpha, focal_gamma: focal-loss parameters of loss_mask.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float], eos_coef: float,
                 losses: Sequence[str] = ("labels", "masks"), fused: bool = False, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"losses: unknown {sorted(unknown)}; expected a subset of ['labels', 'masks']")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = float(eos_coef)
        self.losses = tuple(losses)
        self.fused = fused
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks: float) -> Dict:
        logits = outputs["pred_logits"]
        batch, src, tgt = _flat_indices(indices, logits.device)
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]], device=logits.device).cumsum(0)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch, src] = labels[offsets[batch] + tgt].long()
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight.float())
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks: float) -> Dict:
        pred = outputs["pred_masks"]
        batch, src, tgt = _flat_indices(indices, pred.device)
        all_masks = torch.cat([t["masks"] for t in targets]).to(pred.device)
        offsets = torch.tensor([0] + [len(t["masks"]) for t in targets[:-1]], device=pred.device).cumsum(0)
        # Only the matched masks are gathered: N x H x W in the targets' own (byte) dtype.
        target_masks = all_masks[offsets[batch] + tgt]
        loss_mask, loss_dice = ops.mask_loss(pred[batch, src], target_masks, num_masks, self.focal_alpha,
                                             self.focal_gamma, backend=ops.backend_for(self.fused))
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def get_loss(self, loss: str, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks: float) -> Dict:
        return {"labels": self.loss_labels, "masks": self.loss_masks}[loss](outputs, targets, indices, num_masks)

    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        check_outputs(outputs)
        split_targets(targets)
        if outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits: expected {self.num_classes + 1} classes (K+1), got shape "
                             f"{tuple(outputs['pred_logits'].shape)}")
        layers: List[Dict] = [{k: v for k, v in outputs.items() if k != "aux_outputs"}]
        layers += list(outputs.get("aux_outputs", []))
        # Every layer is matched against the same targets; the solver sees all L x B problems at once.
        indices_per_layer = self.matcher.match_layers(layers, targets)
        num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        losses: Dict[str, torch.Tensor] = {}
        for i, (layer, indices) in enumerate(zip(layers, indices_per_layer)):
            suffix = "" if i == 0 else f"_{i - 1}"
            for loss in self.losses:
                for k, v in self.get_loss(loss, layer, targets, indices, num_masks).items():
                    losses[k + suffix] = v
        return losses

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, fused={self.fused}"
