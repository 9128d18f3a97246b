"""Evaluation metrics: semantic segmentation (mIoU and friends) and panoptic quality (PQ/SQ/RQ)."""
from .panoptic import PanopticEvaluator
from .semantic import SemSegEvaluator

__all__ = ["PanopticEvaluator", "SemSegEvaluator"]
