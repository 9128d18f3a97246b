"""Bipartite matching between predicted and ground-truth masks (the official MaskFormer and
Mask2Former matchers).

The cost of every (query, target) pair is ``cost_class * class + cost_mask * mask + cost_dice *
dice``; each image is solved as a linear assignment. With ``num_points=0`` (MaskFormer) the mask
and dice costs compare the full masks, the mask cost being the sigmoid focal cost (see
``fastmaskformer.ops.matching_cost``); with ``num_points > 0`` (Mask2Former) they compare the masks
at ``num_points`` uniform random points per image and decoder layer, shared by the image's queries
and targets, the mask cost being binary cross-entropy (``ops.point_matching_cost``). The points are
drawn here, in PyTorch, from ``generator`` or the global RNG (each distributed rank draws its own).
With ``fused=True`` the cost of the whole batch comes from one batched call per decoder layer, and
the assignments of all images and layers (:meth:`HungarianMatcher.match_layers`) are solved in one
batched call. Nothing in between reads a tensor's values on the host: the targets are checked once
for all layers from their shapes, and label values and non-finite predictions surface as NaN
costs, which the solver rejects and the matcher then explains. So the host waits for the device
once per step: when the costs go to the host solver, or, with the CUDA solver, when it reports
its status.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops
from .ops._checks import check_label_values, check_tensor
from .point_sampling import random_point_coords

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


def _signature(out: Dict) -> tuple:
    """What the cost's argument checks look at in one layer's predictions."""
    return tuple((t.shape, t.dtype, t.device) for t in (out["pred_logits"], out["pred_masks"]))


class HungarianMatcher(nn.Module):
    """Matches predictions to targets per image at minimum total cost.

    Args:
        cost_class: weight of the classification cost, -softmax(logits)[label].
        cost_mask: weight of the mask cost between mask logits and the target mask: sigmoid focal
            on full masks (``num_points=0``) or binary cross-entropy on the sampled points.
        cost_dice: weight of the dice cost.
        num_points: 0 compares full masks (MaskFormer); more compares them at this many uniform
            random points per image (Mask2Former: 12544).
        fused: use the fastest available backends (batched native cost, batched LAP solver)
            instead of the reference per-image PyTorch + scipy path.
        alpha, gamma: focal-loss parameters of the full-mask cost.
        generator: the ``torch.Generator`` (on the predictions' device) the points are drawn from;
            None draws from the global RNG. Also settable as the ``generator`` attribute.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int = 0,
                 *, fused: bool = False, alpha: float = 0.25, gamma: float = 2.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one of cost_class, cost_mask, cost_dice must be set")
        check_num_points(num_points)
        self.cost_class, self.cost_mask, self.cost_dice = float(cost_class), float(cost_mask), float(cost_dice)
        self.num_points = num_points
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.fused = fused
        self.generator = generator

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Indices:
        """Returns, per image, ``(pred_idx, tgt_idx)`` int64 tensors with min(Q, N_i) pairs."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, outputs_per_layer: Sequence[Dict], targets: Sequence[Dict]) -> List[Indices]:
        """Matches several decoder layers' outputs against the same targets; all L x B assignment
        problems go to the solver in one call. The indices live where the solver left them (the
        host, or the GPU with the CUDA solver)."""
        labels, masks = split_targets(targets)
        for i, out in enumerate(outputs_per_layer):
            check_outputs(out, f"outputs[{i}]" if len(outputs_per_layer) > 1 else "outputs")
        backend = ops.backend_for(self.fused)
        B, L, costs, checked = len(targets), len(outputs_per_layer), [], None
        if self.num_points:
            op, scalars = ops.point_matching_cost, (self.cost_class, self.cost_mask, self.cost_dice)
            device = outputs_per_layer[0]["pred_masks"].device if L else torch.device("cpu")
            # Fresh points for every image of every layer (as the official matcher, called per layer,
            # draws them), in one draw.
            points = random_point_coords(L * B, self.num_points, device, generator_for(self.generator, device))
        else:
            op, scalars = ops.matching_cost, (self.cost_class, self.cost_mask, self.cost_dice, self.alpha, self.gamma)
        try:
            for layer, out in enumerate(outputs_per_layer):
                args = (out["pred_logits"], out["pred_masks"], labels, masks)
                args += (points[layer * B:(layer + 1) * B], *scalars) if self.num_points else scalars
                if _signature(out) == checked:  # the targets and a layer like this one are checked already
                    cost, sizes = op.unchecked(*args, backend=backend)
                else:
                    cost, sizes = op(*args, backend=backend)
                    checked = _signature(out)
                costs.append(cost)
            flat = ops.linear_sum_assignment(torch.cat(costs) if len(costs) > 1 else costs[0],
                                             sizes.repeat(len(costs)), backend=backend)
        except ValueError as exc:  # a bad label or NaN: say which input (reading values is fine now)
            self._explain_failure(exc, outputs_per_layer[0]["pred_logits"].shape[-1] - 1, labels, costs, B)
            raise
        return [flat[i * B:(i + 1) * B] for i in range(len(costs))]

    @staticmethod
    def _explain_failure(exc: Exception, num_classes: int, labels: List[torch.Tensor], costs: List[torch.Tensor],
                         batch_size: int) -> None:
        """Raises the clearest error for a failed step: a label out of range, or the decoder layer and
        image whose real (non-padding) costs are not finite."""
        check_label_values(labels, num_classes)
        sizes = torch.tensor([len(lab) for lab in labels], device=costs[0].device if costs else None)
        for layer, cost in enumerate(costs):
            valid = torch.arange(cost.shape[-1], device=cost.device)[None, :] < sizes[:, None]  # [B, N]
            bad = (~torch.isfinite(cost) & valid[:, None, :]).flatten(1).any(1)
            if bool(bad.any()):
                image = int(bad.nonzero()[0, 0])
                where = f"image {image}" + (f" (decoder output {layer})" if len(costs) > 1 else "")
                raise ValueError(f"HungarianMatcher: the matching cost of {where} contains NaN or Inf; the "
                                 f"predictions (pred_logits / pred_masks) are not finite") from exc

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}, fused={self.fused}")


def check_num_points(num_points, name: str = "num_points") -> None:
    """0 (full masks) or a positive int of points."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 0:
        raise ValueError(f"{name}: expected an int >= 0 (0: full-resolution masks), got {num_points!r}")


def generator_for(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """``generator`` after checking that it draws on ``device`` (torch's own error does not say which
    argument is wrong)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator: expected a generator on the predictions' device ({device.type}), got one on "
                         f"{generator.device.type}")
    return generator
