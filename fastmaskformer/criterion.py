"""MaskFormer's and Mask2Former's set criterion: match, then classification and mask losses on every
decoder layer.

Semantics follow the official ``SetCriterion``s: ``loss_ce`` is the cross-entropy over all queries
(unmatched queries labelled "no object" = K, whose class weight is ``eos_coef``); ``loss_mask`` and
``loss_dice`` compare matched mask logits with their targets, summed over masks and divided by
``num_masks`` (the total number of targets, averaged over distributed ranks, at least 1). Auxiliary
outputs get the same losses with suffix ``_i``. Losses are returned unweighted; the model applies
``weight_dict``.

- ``num_points=0`` (MaskFormer): the logits are upsampled to the target size, ``loss_mask`` is the
  sigmoid focal loss averaged over pixels (``ops.mask_loss``).
- ``num_points > 0`` (Mask2Former): each matched mask is compared at ``num_points`` points chosen by
  importance sampling (``point_sampling.uncertain_point_coords``: ``oversample_ratio`` x uniform
  candidates, the ``importance_sample_ratio`` most uncertain kept, the rest fresh uniform points),
  ``loss_mask`` is binary cross-entropy averaged over the points (``ops.point_mask_loss``). The
  points are drawn in PyTorch from ``generator`` or the global RNG, without a host sync. With
  ``fused=True`` the matched rows are read in place, and when every layer's mask logits are slices
  of one tensor (this package's heads unbind one [L, B, Q, h, w] output) all layers' point losses are
  one call whose backward writes that tensor's gradient once: no per-layer gradient for autograd to
  stack (at B=8 on the CPU, 524 MB fewer written and held).
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ops
from .matcher import HungarianMatcher, Indices, check_num_points, check_outputs, generator_for, split_targets
from .ops._checks import check_finite_scalar
from .point_sampling import importance_points, uncertain_point_coords


def average_num_masks(targets: Sequence[Dict], device: torch.device):
    """Total targets in the batch, summed over ranks and divided by the world size, clamped >= 1.

    The count comes from the targets' shapes (host metadata, no sync). Under torch.distributed the
    sum over ranks stays on the device as a 0-d tensor, so the step still waits for the device only
    once; the losses divide by it all the same.
    """
    n = float(sum(len(t["labels"]) for t in targets))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.full((), n, dtype=torch.float32, device=device)  # a fill, not a host-to-device copy
        dist.all_reduce(total)
        return torch.clamp(total / dist.get_world_size(), min=1)
    return max(n, 1.0)


class _StepTargets:
    """The targets of one step, gathered once for every decoder layer: all labels [T] and masks
    [T, H, W] concatenated on the predictions' device, and where each image's targets start (host
    ints, from the shapes)."""

    def __init__(self, targets: Sequence[Dict], device: torch.device):
        labels, masks = split_targets(targets)
        self.sizes = [int(lab.shape[0]) for lab in labels]
        self.starts = [0]
        for n in self.sizes[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.labels = torch.cat(labels).to(device, torch.int64) if labels else torch.zeros(0, dtype=torch.int64,
                                                                                               device=device)
        self._masks, self._device = masks, device
        self._masks_cat = None

    @property
    def masks(self) -> torch.Tensor:
        """[T, H, W] in the targets' own dtype (bytes stay bytes); concatenated on first use."""
        if self._masks_cat is None:
            self._masks_cat = torch.cat(list(self._masks)).to(self._device)
        return self._masks_cat


class _Matches:
    """The matched pairs of every decoder layer as flat device tensors: image, prediction and
    target (an index into the step's concatenated targets) per pair, and each layer's slice.

    Built once per step. When the solver ran on the host, all indices travel to the device in one
    pinned, non-blocking copy; when it ran on the device, only the host-made image ids and target
    offsets do. No per-layer or per-image transfer, and no read of a device value."""

    def __init__(self, indices_per_layer: Sequence[Indices], step: _StepTargets, device: torch.device):
        counts = [int(src.shape[0]) for layer in indices_per_layer for src, _ in layer]  # shapes: host metadata
        B = len(step.sizes)
        self.bounds = [0]
        for layer in range(len(indices_per_layer)):
            self.bounds.append(self.bounds[-1] + sum(counts[layer * B:(layer + 1) * B]))
        total = self.bounds[-1]
        image = torch.arange(B).repeat(len(indices_per_layer)).repeat_interleave(torch.tensor(counts, dtype=torch.int64)) \
            if counts else torch.zeros(0, dtype=torch.int64)
        start = torch.tensor(step.starts, dtype=torch.int64)[image] if B else image
        pairs = [p for layer in indices_per_layer for p in layer]
        solver_device = pairs[0][0].device if pairs else torch.device("cpu")
        if solver_device.type == "cpu":
            host = torch.empty((4, total), dtype=torch.int64, pin_memory=device.type == "cuda")
            host[0], host[1] = image, start
            if pairs:
                torch.cat([src for src, _ in pairs], out=host[2])
                torch.cat([tgt for _, tgt in pairs], out=host[3])
            flat = host.to(device, non_blocking=True)
            self.image, start, src, tgt = flat.unbind(0)
        else:
            host = torch.stack([image, start])
            if device.type == "cuda":
                host = host.pin_memory()
            meta = host.to(device, non_blocking=True)
            self.image, start = meta[0], meta[1]
            src = torch.cat([s for s, _ in pairs]).to(device)
            tgt = torch.cat([t for _, t in pairs]).to(device)
        self.src = src
        self.target = start + tgt

    def layer(self, i: int):
        """(image, prediction, target) index tensors of decoder layer ``i``: views, no copy."""
        lo, hi = self.bounds[i], self.bounds[i + 1]
        return self.image[lo:hi], self.src[lo:hi], self.target[lo:hi]


_ZERO_AHEAD_MIN_BYTES = 8 << 20


def _zero_ahead(flat: torch.Tensor) -> bool:
    """Whether the fused point loss gets its gradient buffer zeroed ahead, during the draws: float32
    CPU logits that need a gradient, large enough for a thread to pay, outside torch.compile."""
    return (flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.requires_grad
            and torch.is_grad_enabled() and flat.numel() * 4 >= _ZERO_AHEAD_MIN_BYTES
            and not torch.compiler.is_compiling())


class _Zeroing:
    """Zeroes a tensor on a second thread (PyTorch releases the GIL in zero_); join() waits and
    raises what the thread raised, so a buffer that was not zeroed is never used."""

    def __init__(self, t: torch.Tensor):
        self._error: Optional[BaseException] = None

        def run():
            try:
                t.zero_()
            except BaseException as e:  # re-raised by join
                self._error = e

        self._thread = threading.Thread(target=run, name="fastmaskformer-zero-grad", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("zeroing the point loss's gradient buffer failed") from self._error


def _rows_of_one_tensor(masks: Sequence[torch.Tensor]):
    """When every layer's mask logits [B, Q, h, w] are [h, w] rows of one contiguous tensor (the
    unbound [L, B, Q, h, w] output of this package's heads, and of MaskFormer's, whatever the order
    of its L, B and Q dims): that tensor as rows [M, h, w], and per layer the row of its (0, 0) mask
    and the row steps of its B and Q dims; else None. Not while compiling (Dynamo does not trace a
    view's base)."""
    if not masks or torch.compiler.is_compiling():
        return None
    first, base = masks[0], masks[0]._base
    if base is None or not base.is_contiguous() or first.dim() != 4 or first.numel() == 0:
        return None
    h, w = first.shape[-2:]
    if base.numel() % (h * w):
        return None
    layout = []
    for m in masks:
        if m._base is not base or m.shape != first.shape:
            return None
        offset, (sb, sq, sh, sw) = m.storage_offset() - base.storage_offset(), m.stride()
        if (sh, sw) != (w, 1) or offset % (h * w) or sb % (h * w) or sq % (h * w):
            return None
        layout.append((offset // (h * w), sb // (h * w), sq // (h * w)))
    return base.view(-1, h, w), layout


class SetCriterion(nn.Module):
    """The MaskFormer loss.

    Args:
        num_classes: K, the number of real classes (logits have K+1 columns, the last "no object").
        matcher: the :class:`HungarianMatcher` pairing predictions with targets.
        weight_dict: loss name -> weight; kept for the model (this module returns unweighted losses).
        eos_coef: class weight of "no object" in the cross-entropy (0.1 in MaskFormer).
        losses: which losses to compute: any of "labels" (loss_ce) and "masks" (loss_mask, loss_dice).
        num_points: 0 computes the mask losses on full-resolution masks (MaskFormer's sigmoid focal
            + dice); more computes BCE + dice on this many importance-sampled points per mask
            (Mask2Former: 12544).
        oversample_ratio: the importance sampling draws ``int(num_points * oversample_ratio)``
            uniform candidates per mask (>= 1; Mask2Former: 3).
        importance_sample_ratio: fraction of the points taken from the most uncertain candidates
            (``-|logit|``), the rest being fresh uniform points (in [0, 1]; Mask2Former: 0.75).
        fused: use fused backends for the mask loss (and the matcher's own flag for matching).
        focal_alpha, focal_gamma: focal-loss parameters of the full-resolution loss_mask.
        generator: the ``torch.Generator`` (on the predictions' device) the points are drawn from;
            None draws from the global RNG. Also settable as the ``generator`` attribute.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float], eos_coef: float,
                 losses: Sequence[str] = ("labels", "masks"), num_points: int = 0, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, *, fused: bool = False, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"losses: unknown {sorted(unknown)}; expected a subset of ['labels', 'masks']")
        check_num_points(num_points)
        check_finite_scalar("oversample_ratio", oversample_ratio)
        check_finite_scalar("importance_sample_ratio", importance_sample_ratio)
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio: expected a number >= 1, got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"importance_sample_ratio: expected a fraction in [0, 1], got {importance_sample_ratio}")
        self.num_points = num_points
        self.oversample_ratio, self.importance_sample_ratio = float(oversample_ratio), float(importance_sample_ratio)
        self.generator = generator
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

    def loss_labels(self, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks) -> Dict:
        step = _StepTargets(targets, outputs["pred_logits"].device)
        return self._loss_labels(outputs, step, _Matches([indices], step, step.labels.device).layer(0))

    def loss_masks(self, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks) -> Dict:
        step = _StepTargets(targets, outputs["pred_masks"].device)
        matched = _Matches([indices], step, step.labels.device).layer(0)
        return self._loss_masks(outputs, step, matched, num_masks, None if self._in_place() else step.masks[matched[2]])

    def get_loss(self, loss: str, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks) -> Dict:
        return {"labels": self.loss_labels, "masks": self.loss_masks}[loss](outputs, targets, indices, num_masks)

    def _loss_labels(self, outputs: Dict, step: _StepTargets, matched) -> Dict:
        logits = outputs["pred_logits"]
        image, src, tgt = matched
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[image, src] = step.labels[tgt]
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight.float())
        return {"loss_ce": loss_ce}

    def _loss_masks(self, outputs: Dict, step: _StepTargets, matched, num_masks,
                    target_masks: Optional[torch.Tensor] = None) -> Dict:
        """target_masks: the matched targets (N x H x W in their own, byte, dtype), gathered for every
        layer at once; None where the fused point loss reads them in place (:meth:`_in_place`)."""
        masks, backend = outputs["pred_masks"], ops.backend_for(self.fused)
        image, src, tgt = matched
        if not self.num_points:
            loss_mask, loss_dice = ops.mask_loss(masks[image, src], target_masks, num_masks, self.focal_alpha,
                                                 self.focal_gamma, backend=backend)
        elif self._in_place():
            loss_mask, loss_dice = self._point_losses_in_place(masks.flatten(0, 1), [image * masks.shape[1] + src],
                                                               step.masks, tgt, num_masks)
        else:
            pred = masks[image, src]
            coords = uncertain_point_coords(pred[:, None], self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio, generator_for(self.generator, pred.device))
            loss_mask, loss_dice = ops.point_mask_loss(pred, target_masks, coords, num_masks, backend=backend)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def _in_place(self) -> bool:
        """Whether the point losses read the matched rows in place (the fused path) rather than from
        gathered copies (the reference path, as the official criterion does)."""
        return bool(self.num_points) and self.fused

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
        return self.losses_from_matches(layers, targets, indices_per_layer)

    def losses_from_matches(self, layers: Sequence[Dict], targets: Sequence[Dict],
                            indices_per_layer: Sequence[Indices]) -> Dict[str, torch.Tensor]:
        """The losses of every decoder layer given its matched indices: the part of ``forward``
        after the matcher, with no host sync and no graph break (``torch.compile(fullgraph=True)``
        traces it). ``layers[0]`` is the last decoder layer, ``layers[1:]`` the aux outputs."""
        device = layers[0]["pred_logits"].device
        step = _StepTargets(targets, device)
        matches = _Matches(indices_per_layer, step, device)
        num_masks = average_num_masks(targets, device)
        target_masks = [None] * len(layers)
        if "masks" in self.losses and not self._in_place():  # every layer's matched target masks in one gather
            target_masks = step.masks[matches.target].split(
                [hi - lo for lo, hi in zip(matches.bounds[:-1], matches.bounds[1:])])
        stacked = _rows_of_one_tensor([layer["pred_masks"] for layer in layers]) \
            if "masks" in self.losses and self._in_place() else None
        if stacked is not None:  # every layer's point losses in one call: one gradient of the whole tensor
            flat, layout = stacked
            rows = [start + matches.layer(i)[0] * image_step + matches.layer(i)[1] * query_step
                    for i, (start, image_step, query_step) in enumerate(layout)]
            groups = [hi - lo for lo, hi in zip(matches.bounds[:-1], matches.bounds[1:])]
            every_mask, every_dice = self._point_losses_in_place(flat, rows, step.masks, matches.target, num_masks,
                                                                 groups)
        losses: Dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            suffix = "" if i == 0 else f"_{i - 1}"
            image, src, tgt = matches.layer(i)
            for loss in self.losses:
                if loss == "labels":
                    out = self._loss_labels(layer, step, (image, src, tgt))
                elif stacked is not None:
                    out = {"loss_mask": every_mask[i], "loss_dice": every_dice[i]}
                else:
                    out = self._loss_masks(layer, step, (image, src, tgt), num_masks, target_masks[i])
                losses.update({k + suffix: v for k, v in out.items()})
        return losses

    def _point_losses_in_place(self, flat: torch.Tensor, rows: Sequence[torch.Tensor], target_masks: torch.Tensor,
                               target_index: torch.Tensor, num_masks, groups: Optional[List[int]] = None):
        """The fused point losses of the matched masks ``rows`` (one index tensor per layer) of the
        logits ``flat`` [M, h, w] against rows ``target_index`` of ``target_masks``, all read where
        they lie: no gathered copy of either, and the backward writes ``flat``'s gradient directly
        instead of a gradient of a copy that an index_put scatters into zeros. Each layer's points are
        drawn as the reference draws them, in layer order, into one [N, P, 2] tensor. ``groups``: one
        loss per layer (ops.point_mask_loss's groups)."""
        backend, device = ops.backend_for(self.fused), flat.device
        source, generator = flat.detach(), generator_for(self.generator, device)
        coords = torch.empty(sum(r.shape[0] for r in rows), self.num_points, 2, device=device, dtype=torch.float32)
        # The gradient of flat, zeroed a part per layer on a second thread while this one draws that
        # layer's points (the CPU generator draws on one thread; the backward would otherwise zero
        # fresh pages first, 0.09 s at B=8: ops/_point_mask_loss.py).
        grad_out = torch.empty_like(flat, memory_format=torch.contiguous_format) if _zero_ahead(flat) else None
        parts = grad_out.view(-1).tensor_split(len(rows)) if grad_out is not None else [None] * len(rows)
        # On the CPU every layer's candidates are drawn into one buffer: a fresh [n, 3P, 2] tensor per
        # layer would fault in new pages each time (24 MB a layer at B=8), where these stay mapped.
        workspace = None
        if device.type == "cpu" and rows and not torch.compiler.is_compiling():
            workspace = torch.empty(max(r.shape[0] for r in rows) * int(self.num_points * self.oversample_ratio) * 2,
                                    device=device, dtype=torch.float32)
        lo = 0
        for r, part in zip(rows, parts):
            hi = lo + r.shape[0]
            zeroing = _Zeroing(part) if part is not None else None
            try:
                importance_points(hi - lo, self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                                  lambda c, r=r: ops.point_uncertainty(source, c, r, backend=backend), device,
                                  generator, out=coords[lo:hi], workspace=workspace)
            finally:
                if zeroing is not None:
                    zeroing.join()
            lo = hi
        return ops.point_mask_loss(flat, target_masks, coords, num_masks, pred_index=torch.cat(list(rows)),
                                   target_index=target_index, groups=groups, grad_out=grad_out, backend=backend)

    def extra_repr(self) -> str:
        points = (f", num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
                  f"importance_sample_ratio={self.importance_sample_ratio}") if self.num_points else ""
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}{points}, "
                f"fused={self.fused}")
