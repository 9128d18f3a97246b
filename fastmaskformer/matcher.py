"""Bipartite matching between predicted and ground-truth masks (the official MaskFormer matcher).

The cost of every (query, target) pair is ``cost_class * class + cost_mask * focal + cost_dice *
dice`` (see ``fastmaskformer.ops.matching_cost``); each image is solved as a linear assignment.
With ``fused=True`` the cost of the whole batch comes from one batched call, and the assignments of
all images (and of all decoder layers, through :meth:`HungarianMatcher.match_layers`) are solved in
one batched call: one host synchronization per training step instead of one per image and layer.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from . import ops
from .ops._checks import check_tensor

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def check_outputs(outputs: Dict, name: str = "outputs") -> None:
    if not isinstance(outputs, dict):
        raise TypeError(f"{name}: expected a dict with 'pred_logits' and 'pred_masks', got {type(outputs).__name__}")
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise KeyError(f"{name}: missing key {key!r} (has {sorted(outputs)})")
    check_tensor(f"{name}['pred_logits']", outputs["pred_logits"], 3)
    check_tensor(f"{name}['pred_masks']", outputs["pred_masks"], 4)


def split_targets(targets: Sequence[Dict]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The labels and masks of a list of target dicts, with a clear error for a malformed one."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets: expected a list of dicts (one per image), got {type(targets).__name__}")
    labels, masks = [], []
    for i, t in enumerate(targets):
        if not isinstance(t, dict):
            raise TypeError(f"targets[{i}]: expected a dict with 'labels' and 'masks', got {type(t).__name__}")
        for key in ("labels", "masks"):
            if key not in t:
                raise KeyError(f"targets[{i}]: missing key {key!r} (has {sorted(t)})")
        labels.append(t["labels"])
        masks.append(t["masks"])
    return labels, masks


class HungarianMatcher(nn.Module):
    """Matches predictions to targets per image at minimum total cost.

    Args:
        cost_class: weight of the classification cost, -softmax(logits)[label].
        cost_mask: weight of the sigmoid focal cost between mask logits and the target mask.
        cost_dice: weight of the dice cost.
        fused: use the fastest available backends (batched native cost, batched LAP solver)
            instead of the reference per-image PyTorch + scipy path.
        alpha, gamma: focal-loss parameters of the mask cost.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, fused: bool = False,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one of cost_class, cost_mask, cost_dice must be set")
        self.cost_class, self.cost_mask, self.cost_dice = float(cost_class), float(cost_mask), float(cost_dice)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.fused = fused

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Indices:
        """Returns, per image, ``(pred_idx, tgt_idx)`` int64 tensors with min(Q, N_i) pairs."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, outputs_per_layer: Sequence[Dict], targets: Sequence[Dict]) -> List[Indices]:
        """Matches several decoder layers' outputs against the same targets; all L x B assignment
        problems go to the solver in one call."""
        labels, masks = split_targets(targets)
        backend = ops.backend_for(self.fused)
        costs = []
        for i, out in enumerate(outputs_per_layer):
            check_outputs(out, f"outputs[{i}]" if len(outputs_per_layer) > 1 else "outputs")
            cost, sizes = ops.matching_cost(out["pred_logits"], out["pred_masks"], labels, masks, self.cost_class,
                                            self.cost_mask, self.cost_dice, self.alpha, self.gamma, backend=backend)
            costs.append(cost)
        cost = torch.cat(costs) if len(costs) > 1 else costs[0]
        sizes_all = sizes.repeat(len(costs))
        _check_finite(cost, sizes_all, len(targets))
        flat = ops.linear_sum_assignment(cost, sizes_all, backend=backend)
        B = len(targets)
        return [flat[i * B:(i + 1) * B] for i in range(len(costs))]

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"fused={self.fused}")


def _check_finite(cost: torch.Tensor, sizes: torch.Tensor, batch_size: int) -> None:
    """A NaN or Inf in a real (non-padding) cost entry means the predictions are broken: say which
    image (and decoder layer) instead of failing inside the solver. One host sync per call."""
    if cost.numel() == 0:
        return
    valid = torch.arange(cost.shape[-1], device=cost.device)[None, :] < sizes.to(cost.device)[:, None]  # [LB, N]
    bad = (~torch.isfinite(cost) & valid[:, None, :]).flatten(1).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        layer, image = divmod(i, batch_size)
        where = f"image {image}" + (f" (decoder output {layer})" if cost.shape[0] > batch_size else "")
        raise ValueError(f"HungarianMatcher: the matching cost of {where} contains NaN or Inf; the predictions "
                         f"(pred_logits / pred_masks) are not finite")
