"""Panoptic quality (PQ = SQ x RQ) following the COCO panoptic definition (Kirillov et al. 2019 and
the reference panopticapi ``pq_compute``), on segment-id maps in contiguous class ids.

Per image: a predicted and a ground-truth segment of one category match when IoU > 0.5, where the
union leaves out the prediction's overlap with void (id 0). Unmatched ground truth is a false
negative unless it is a crowd region; an unmatched prediction is a false positive unless more than
half of its area lies on void or on a crowd region of its own category. Per class:
PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2); classes with no
TP, FP or FN are left out of the averages.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..ops._checks import check_same_device, check_tensor
from ._distributed import all_reduce_sum
from .semantic import INT_DTYPES

VOID = 0


def _areas(ids: torch.Tensor) -> Dict[int, int]:
    """{id: pixel count}."""
    if ids.is_cuda:
        values, counts = torch.unique(ids, return_counts=True)
    else:  # NumPy's sort-based unique is an order of magnitude faster than torch.unique on CPU
        values, counts = np.unique(ids.numpy(), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _segments_by_id(name: str, segments: Sequence[dict], num_classes: int) -> Dict[int, dict]:
    out = {}
    for s in segments:
        sid, cat = int(s["id"]), int(s["category_id"])
        if sid == VOID:
            raise ValueError(f"{name}: segment id 0 is reserved for void, got a segment with id 0")
        if not 0 <= cat < num_classes:
            raise ValueError(f"{name}: category_id must lie in [0, {num_classes}), got {cat} for segment {sid}")
        out[sid] = s
    return out


class PanopticEvaluator:
    """Accumulates per-class [sum IoU, TP, FP, FN] over ``process`` calls; ``evaluate`` reduces the
    table across ranks and returns percentages overall, for things, for stuff and per class."""

    def __init__(self, num_classes: int, thing_classes: Sequence[int], class_names: Optional[Sequence[str]] = None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        bad = [c for c in thing_classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"thing_classes: expected ids in [0, {num_classes}), got {bad}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.num_classes = int(num_classes)
        self.is_thing = torch.zeros(num_classes, dtype=torch.bool)
        self.is_thing[[int(c) for c in thing_classes]] = True
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(self.num_classes, 4, dtype=torch.float64)  # sum IoU, TP, FP, FN

    def process(self, pred_ids: torch.Tensor, pred_segments: Sequence[dict],
                gt_ids: torch.Tensor, gt_segments: Sequence[dict]) -> None:
        """One image. pred_ids/gt_ids: integer segment-id maps [H,W] (0 = void); *_segments: dicts with
        "id" and "category_id" (contiguous), gt ones optionally "iscrowd". Segments listed without
        pixels are ignored; a non-zero id in a map without a listed segment is an error."""
        check_tensor("pred_ids", pred_ids, 2, INT_DTYPES)
        check_tensor("gt_ids", gt_ids, 2, INT_DTYPES)
        if pred_ids.shape != gt_ids.shape:
            raise ValueError(f"pred_ids and gt_ids: expected one shape, got {tuple(pred_ids.shape)} and "
                             f"{tuple(gt_ids.shape)}")
        check_same_device(pred_ids=pred_ids, gt_ids=gt_ids)
        pred_segs = _segments_by_id("pred_segments", pred_segments, self.num_classes)
        gt_segs = _segments_by_id("gt_segments", gt_segments, self.num_classes)
        pred_ids, gt_ids = pred_ids.long(), gt_ids.long()
        pred_area, gt_area = _areas(pred_ids), _areas(gt_ids)
        for name, areas, segs in (("pred_ids", pred_area, pred_segs), ("gt_ids", gt_area, gt_segs)):
            unknown = sorted(set(areas) - set(segs) - {VOID})
            if unknown:
                raise ValueError(f"{name}: segment ids {unknown[:5]} appear in the map but not in the segment list")

        # Joint (gt, pred) id histogram: every overlap the matching needs, from one pass over the pixels.
        offset = int(pred_ids.max()) + 1 if pred_ids.numel() else 1
        overlap = {divmod(k, offset): n for k, n in _areas(gt_ids * offset + pred_ids).items()}

        stats = torch.zeros_like(self.stats)
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in overlap.items():
            if g == VOID or p == VOID:
                continue
            gs, ps = gt_segs[g], pred_segs[p]
            if gs.get("iscrowd", 0) or int(gs["category_id"]) != int(ps["category_id"]):
                continue
            union = pred_area[p] + gt_area[g] - inter - overlap.get((VOID, p), 0)
            iou = inter / union
            if iou > 0.5:
                cat = int(gs["category_id"])
                stats[cat, 0] += iou
                stats[cat, 1] += 1
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_of = {int(s["category_id"]): g for g, s in gt_segs.items() if s.get("iscrowd", 0) and g in gt_area}
        for g, s in gt_segs.items():
            if g in gt_area and g not in gt_matched and not s.get("iscrowd", 0):
                stats[int(s["category_id"]), 3] += 1
        for p, s in pred_segs.items():
            if p not in pred_area or p in pred_matched:
                continue
            cat = int(s["category_id"])
            ignored = overlap.get((VOID, p), 0) + (overlap.get((crowd_of[cat], p), 0) if cat in crowd_of else 0)
            if ignored / pred_area[p] <= 0.5:
                stats[cat, 2] += 1
        self.stats += stats

    def _average(self, stats: torch.Tensor, select: torch.Tensor) -> Dict[str, float]:
        iou, tp, fp, fn = stats[select].unbind(1)
        present = (tp + fp + fn) > 0
        if not present.any():
            return {"PQ": math.nan, "SQ": math.nan, "RQ": math.nan, "n": 0}
        iou, tp, fp, fn = iou[present], tp[present], fp[present], fn[present]
        denom = tp + 0.5 * fp + 0.5 * fn
        sq = torch.where(tp > 0, iou / tp.clamp(min=1), torch.zeros_like(iou))
        return {"PQ": 100 * (iou / denom).mean().item(), "SQ": 100 * sq.mean().item(),
                "RQ": 100 * (tp / denom).mean().item(), "n": int(present.sum())}

    def evaluate(self) -> Dict:
        """{"PQ","SQ","RQ", "PQ_th","SQ_th","RQ_th", "PQ_st","SQ_st","RQ_st"} in percent (NaN when no
        segment of that group was seen) and "per_class": {name: {"PQ","SQ","RQ"}} for seen classes."""
        stats = all_reduce_sum(self.stats)
        out: Dict = {}
        for suffix, select in (("", torch.ones_like(self.is_thing)), ("_th", self.is_thing), ("_st", ~self.is_thing)):
            avg = self._average(stats, select)
            out.update({f"{k}{suffix}": avg[k] for k in ("PQ", "SQ", "RQ")})
        per_class: List = []
        for c, name in enumerate(self.class_names):
            one = torch.zeros_like(self.is_thing)
            one[c] = True
            avg = self._average(stats, one)
            if avg["n"]:
                per_class.append((name, {k: avg[k] for k in ("PQ", "SQ", "RQ")}))
        out["per_class"] = dict(per_class)
        return out
