"""Mask AP of instance predictions with pycocotools' ``COCOeval`` (iouType "segm"), the COCO
definition: AP averaged over IoU thresholds 0.50:0.05:0.95 and 101 recall points, AP50, AP75, and AP
of small (< 32^2 px), medium and large objects, at most 100 detections per image; crowd regions
swallow the detections that fall on them instead of counting them as false positives.

Predictions are compared, at the original image size, with the annotations of the dataset's JSON
(a pycocotools ``COCO`` index), so the numbers are the official ones whatever the test resize.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def _percent(v: float) -> float:
    return math.nan if v < 0 else 100.0 * float(v)  # COCOeval's -1: no ground truth in that group


class InstanceEvaluator:
    """Collects COCO-format detections over ``process`` calls; ``evaluate`` gathers them from every
    rank and returns AP, AP50, AP75, APs, APm, APl (percent, NaN where no object of the group
    exists) and "per_class" AP."""

    def __init__(self, coco_gt, category_ids: Sequence[int], class_names: Optional[Sequence[str]] = None):
        if not hasattr(coco_gt, "imgs") or not hasattr(coco_gt, "loadRes"):
            raise ValueError(f"coco_gt: expected a pycocotools COCO index, got {type(coco_gt).__name__}")
        unknown = [c for c in category_ids if c not in coco_gt.cats]
        if unknown:
            raise ValueError(f"category_ids: expected ids of coco_gt's categories, got {unknown}")
        if class_names is not None and len(class_names) != len(category_ids):
            raise ValueError(f"class_names: expected {len(category_ids)} names, got {len(class_names)}")
        self.coco_gt = coco_gt
        self.category_ids = [int(c) for c in category_ids]
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in self.category_ids]
        self.reset()

    def reset(self) -> None:
        self.results: List[Dict] = []
        self.image_ids: List[int] = []

    def process(self, image_id: int, scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        """One image of the JSON: ``scores`` [n], contiguous ``labels`` [n], ``masks`` bool [n,h,w] at
        the predicted size; masks of another size than the image's are resized (bilinear, > 0.5)."""
        from pycocotools import mask as mask_util

        if int(image_id) not in self.coco_gt.imgs:
            raise ValueError(f"image_id: expected an image of the ground-truth JSON, got {image_id}")
        n = scores.shape[0] if scores.dim() == 1 else -1
        if n < 0 or tuple(labels.shape) != (n,) or masks.dim() != 3 or masks.shape[0] != n:
            raise ValueError(f"scores, labels, masks: expected [n], [n], [n,h,w], got {tuple(scores.shape)}, "
                             f"{tuple(labels.shape)}, {tuple(masks.shape)}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= len(self.category_ids)):
            raise ValueError(f"labels: expected classes in [0, {len(self.category_ids)}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        info = self.coco_gt.imgs[int(image_id)]
        size = (int(info["height"]), int(info["width"]))
        masks = masks.detach()
        if n and tuple(masks.shape[-2:]) != size:
            masks = F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0] > 0.5
        masks = np.asfortranarray(masks.bool().cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
        rles = mask_util.encode(masks) if n else []
        for rle, s, c in zip(rles, scores.tolist(), labels.tolist()):
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-able, as a results file holds it
            self.results.append({"image_id": int(image_id), "category_id": self.category_ids[c],
                                 "segmentation": rle, "score": float(s)})
        self.image_ids.append(int(image_id))

    def _gathered(self):
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.results, self.image_ids
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.results, self.image_ids))
        return [r for p in parts for r in p[0]], [i for p in parts for i in p[1]]

    def evaluate(self) -> Dict:
        from pycocotools.cocoeval import COCOeval

        results, image_ids = self._gathered()
        image_ids = sorted(set(image_ids))
        has_gt = any(not a.get("iscrowd", 0) for i in image_ids for a in self.coco_gt.imgToAnns[i])
        if not results:  # nothing detected: AP 0 where there was something to find
            empty = 0.0 if has_gt else math.nan
            return {**{k: empty for k in SUMMARY}, "per_class": {}}
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval reports progress on stdout
            coco_dt = self.coco_gt.loadRes(results)
            ev = COCOeval(self.coco_gt, coco_dt, "segm")
            ev.params.imgIds = image_ids
            ev.params.catIds = self.category_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out: Dict = {k: _percent(v) for k, v in zip(SUMMARY, ev.stats[:6])}
        # precision [T IoUs, R recalls, K classes, A areas, M maxDets]: area "all", 100 detections.
        precision = ev.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, name in enumerate(self.class_names):
            p = precision[:, :, k]
            if (p > -1).any():
                per_class[name] = 100.0 * float(p[p > -1].mean())
        out["per_class"] = per_class
        return out
