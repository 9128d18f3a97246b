"""Evaluation metrics: semantic segmentation (mIoU and friends), panoptic quality (PQ/SQ/RQ) and
COCO mask AP (pycocotools, imported when an InstanceEvaluator runs)."""
from .instance import InstanceEvaluator
from .panoptic import PanopticEvaluator
from .semantic import SemSegEvaluator

__all__ = ["InstanceEvaluator", "PanopticEvaluator", "SemSegEvaluator"]
