"""Post-processing of MaskFormer / Mask2Former outputs into semantic, panoptic or instance results.

Every function takes one image's ``pred_logits`` [Q, K+1] (class logits, the last column is "no
object") and ``pred_masks`` [Q, H, W] mask logits, already at the output size for panoptic and
instance; the semantic one also takes a batch [B, Q, K+1], [B, Q, h, w] and can upsample the masks
itself (see :func:`semantic_inference`). They compute in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_tensor


def _check_outputs(pred_logits, pred_masks, batched: bool = False) -> None:
    """One image's [Q, K+1] and [Q, H, W], or with ``batched`` a batch's [B, Q, K+1] and [B, Q, H, W]."""
    check_tensor("pred_logits", pred_logits, 2 + batched, FLOAT_DTYPES)
    check_tensor("pred_masks", pred_masks, 3 + batched, FLOAT_DTYPES)
    check_same_device(pred_logits=pred_logits, pred_masks=pred_masks)
    if pred_masks.shape[:1 + batched] != pred_logits.shape[:1 + batched]:
        expected = (f"[B, Q] = {tuple(pred_logits.shape[:2])} masks" if batched
                    else f"{pred_logits.shape[0]} masks")
        raise ValueError(f"pred_masks: expected {expected} (one per query of pred_logits), "
                         f"got shape {tuple(pred_masks.shape)}")
    if pred_logits.shape[-1] < 2:
        raise ValueError(f"pred_logits: expected {'[B, Q, K+1]' if batched else '[Q, K+1]'} with K >= 1 (the last "
                         f"column is no-object), got shape {tuple(pred_logits.shape)}")


def _is_thing(labels: torch.Tensor, thing_classes: Optional[Collection[int]]) -> torch.Tensor:
    """Bool per label; with ``thing_classes=None`` every class is a thing."""
    if thing_classes is None:
        return torch.ones_like(labels, dtype=torch.bool)
    things = torch.as_tensor(sorted(int(c) for c in thing_classes), dtype=labels.dtype, device=labels.device)
    return torch.isin(labels, things)


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                       output_size: Optional[Sequence[int]] = None, fused: bool = False) -> torch.Tensor:
    """Per-class scores [K, H, W] = sum_q softmax(logits_q)[:K] * sigmoid(upsampled mask_q).

    One image ([Q, K+1], [Q, h, w] -> [K, H, W]) or a batch ([B, Q, K+1], [B, Q, h, w] -> [B, K, H, W],
    one op call for all images). ``pred_masks`` may be at any resolution: they are bilinearly upsampled
    to ``output_size`` (default: their own size). With ``fused=True`` the upsampled probabilities are
    never stored.
    """
    batched = isinstance(pred_logits, torch.Tensor) and pred_logits.dim() == 3
    _check_outputs(pred_logits, pred_masks, batched)
    size = tuple(pred_masks.shape[-2:]) if output_size is None else tuple(output_size)
    if batched:
        return ops.semantic_inference(pred_logits, pred_masks, size, backend=ops.backend_for(fused))
    return ops.semantic_inference(pred_logits[None], pred_masks[None], size, backend=ops.backend_for(fused))[0]


def panoptic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8, thing_classes: Optional[Collection[int]] = None
                       ) -> Tuple[torch.Tensor, List[Dict]]:
    """The official MaskFormer panoptic post-processing.

    Queries whose top class is not "no object" and whose probability exceeds
    ``object_mask_threshold`` are kept; each pixel goes to the kept query with the highest
    ``score * sigmoid(mask)``. A query becomes a segment when it wins some pixels and those are at
    least ``overlap_threshold`` of its own mask (sigmoid >= 0.5); queries of one stuff class share
    one segment (the first one's id and score), things get one segment each.

    Returns ``(segment ids int32 [H, W], 0 = void; segments_info)`` with one
    ``{"id", "category_id", "isthing", "score"}`` per segment, ids 1, 2, ... in query order.
    """
    _check_outputs(pred_logits, pred_masks)
    check_finite_scalar("object_mask_threshold", object_mask_threshold)
    check_finite_scalar("overlap_threshold", overlap_threshold)
    K = pred_logits.shape[1] - 1
    scores, labels = pred_logits.float().softmax(-1).max(-1)
    keep = (labels != K) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], pred_masks[keep].float().sigmoid()
    H, W = pred_masks.shape[-2:]
    if masks.shape[0] == 0:
        return torch.zeros((H, W), dtype=torch.int32, device=pred_masks.device), []
    owner = (scores[:, None, None] * masks).argmax(0)  # [H, W]: the winning kept query per pixel
    won_area = torch.bincount(owner.flatten(), minlength=masks.shape[0])
    own_area = (masks >= 0.5).flatten(1).sum(1)
    isthing = _is_thing(labels, thing_classes)
    # One host copy; the decisions below are a loop over at most Q small numbers.
    won_l, own_l, lab_l, sc_l, th_l = (t.tolist() for t in (won_area, own_area, labels, scores, isthing))
    segment_of_query = [0] * len(lab_l)
    stuff_segment: Dict[int, int] = {}
    segments_info: List[Dict] = []
    for k, (won, own, label, score, thing) in enumerate(zip(won_l, own_l, lab_l, sc_l, th_l)):
        if won == 0 or own == 0 or won / own < overlap_threshold:
            continue
        if not thing and label in stuff_segment:
            segment_of_query[k] = stuff_segment[label]
            continue
        segment_id = len(segments_info) + 1
        if not thing:
            stuff_segment[label] = segment_id
        segment_of_query[k] = segment_id
        segments_info.append({"id": segment_id, "category_id": int(label), "isthing": bool(thing),
                              "score": float(score)})
    # The winning pixels of a query form its segment; pixels of dropped queries stay void.
    lut = torch.tensor(segment_of_query, dtype=torch.int32, device=owner.device)
    return lut[owner], segments_info


def instance_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, topk: int = 100,
                       thing_classes: Optional[Collection[int]] = None) -> Dict[str, torch.Tensor]:
    """Mask2Former-style instance post-processing.

    Every (query, class) pair is a candidate scored by its class probability; the ``topk`` best
    are kept (in that order), those of stuff classes dropped when ``thing_classes`` is given. Each
    keeps its query's mask logits > 0 as its mask, and its score becomes class probability x the
    mean mask probability inside that mask.

    Returns ``{"scores": float [n], "labels": int64 [n], "masks": bool [n, H, W]}``.
    """
    _check_outputs(pred_logits, pred_masks)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive int, got {topk!r}")
    Q, K = pred_logits.shape[0], pred_logits.shape[1] - 1
    probs = pred_logits.float().softmax(-1)[:, :K].flatten()  # [Q*K], query-major
    cls_scores, idx = probs.topk(min(topk, Q * K), sorted=True)
    labels, query = idx % K, idx // K
    keep = _is_thing(labels, thing_classes)
    cls_scores, labels, query = cls_scores[keep], labels[keep], query[keep]
    logits = pred_masks[query].float()  # [n, H, W]
    masks = logits > 0
    inside = (logits.sigmoid() * masks).flatten(1).sum(1)
    mask_scores = inside / (masks.flatten(1).sum(1) + 1e-6)
    return {"scores": cls_scores * mask_scores, "labels": labels, "masks": masks}
