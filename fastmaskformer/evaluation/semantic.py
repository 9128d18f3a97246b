"""Semantic segmentation metrics (mIoU, fwIoU, pixel and mean accuracy) from a confusion matrix.

Follows the official detectron2 SemSegEvaluator used by MaskFormer: ignored ground-truth pixels are
routed to an extra "ignore" row so they never count as predictions, and a class enters the means only
when it has ground-truth pixels (classes without any are NaN in the per-class table).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from ..ops._checks import check_same_device, check_tensor
from ._distributed import all_reduce_sum

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class SemSegEvaluator:
    """Accumulates a (K+1) x (K+1) confusion matrix (rows: prediction, columns: ground truth; index K
    is the ignore bin) over ``process`` calls; ``evaluate`` reduces it across ranks and returns
    percentages."""

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Optional[Sequence[str]] = None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.conf = torch.zeros(self.num_classes + 1, self.num_classes + 1, dtype=torch.int64)

    def process(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: integer class maps [H,W] or [B,H,W] of one shape; gt may hold ``ignore_label``."""
        check_tensor("pred", pred, dtypes=INT_DTYPES)
        check_tensor("gt", gt, dtypes=INT_DTYPES)
        if pred.dim() not in (2, 3) or pred.shape != gt.shape:
            raise ValueError(f"pred and gt: expected two [H,W] or [B,H,W] maps of one shape, got pred "
                             f"{tuple(pred.shape)} and gt {tuple(gt.shape)}")
        check_same_device(pred=pred, gt=gt)
        K = self.num_classes
        pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
        ignored = gt == self.ignore_label
        bad_gt = ~ignored & ((gt < 0) | (gt >= K))
        if bad_gt.any():
            raise ValueError(f"gt: labels must lie in [0, {K}) or equal ignore_label={self.ignore_label}, "
                             f"got {gt[bad_gt][0].item()}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= K):
            raise ValueError(f"pred: classes must lie in [0, {K}), got range [{int(pred.min())}, {int(pred.max())}]")
        gt = torch.where(ignored, K, gt)
        pred = torch.where(ignored, K, pred)
        counts = torch.bincount(pred * (K + 1) + gt, minlength=(K + 1) ** 2)
        self.conf += counts.reshape(K + 1, K + 1).cpu()

    def evaluate(self) -> Dict:
        """{"mIoU", "fwIoU", "pixel_acc", "mean_acc" (percent), "per_class_iou": {name: percent or NaN}}."""
        conf = all_reduce_sum(self.conf).double()[:-1, :-1]
        tp = conf.diagonal()
        pos_gt = conf.sum(0)
        pos_pred = conf.sum(1)
        has_gt = pos_gt > 0
        nan = torch.full_like(tp, math.nan)
        acc = torch.where(has_gt, tp / pos_gt.clamp(min=1), nan)
        iou = torch.where(has_gt, tp / (pos_gt + pos_pred - tp).clamp(min=1), nan)
        total = pos_gt.sum()
        if total == 0:
            return {"mIoU": math.nan, "fwIoU": math.nan, "pixel_acc": math.nan, "mean_acc": math.nan,
                    "per_class_iou": {n: math.nan for n in self.class_names}}
        return {
            "mIoU": 100 * iou[has_gt].mean().item(),
            "fwIoU": 100 * (iou[has_gt] * pos_gt[has_gt] / total).sum().item(),
            "pixel_acc": 100 * (tp.sum() / total).item(),
            "mean_acc": 100 * acc[has_gt].mean().item(),
            "per_class_iou": {n: 100 * v for n, v in zip(self.class_names, iou.tolist())},
        }
