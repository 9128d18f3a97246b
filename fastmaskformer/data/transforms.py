"""Augmentation of samples (image, sem_seg, pan_seg, segments) and the training targets derived from them.

Training follows the official MaskFormer semantic recipe (detectron2 mapper): resize the shorter side
to ``base_size`` times a scale drawn from {min_scale, min_scale + 0.1, ..., max_scale} (longer side
capped), a random crop of ``crop_size`` that is re-drawn (up to 10 times) while one class covers
``max_single_class_ratio`` or more of its labelled pixels, SSD-style photometric distortion, a random
horizontal flip, then padding to the crop size (image 0, sem_seg ignore, pan_seg void, so padded
pixels belong to no mask). Evaluation only resizes the shorter side to ``test_size``.

Every geometric step moves the label maps with the image; ``labels``/``masks`` are derived from the
maps at the very end (:func:`add_targets`), so a crop never leaves an empty mask behind. Random draws
use torch's global generator, which DataLoader seeds per worker and checkpoints can save.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

Sample = Dict
# Integer maps [H,W] and instance mask stacks [N,H,W] that move with the image; nearest resampling.
LABEL_MAPS = ("sem_seg", "pan_seg", "inst_masks")
FILL = {"image": 0.0, "pan_seg": 0, "inst_masks": False}  # padding; sem_seg pads with the ignore label


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _coin() -> bool:
    return torch.rand(()).item() < 0.5


def unique(t: torch.Tensor, return_inverse: bool = False):
    """Sorted distinct values of a CPU tensor (and the index of each element's value). NumPy's sort
    is an order of magnitude faster than torch.unique on CPU, which matters per sample."""
    out = np.unique(t.numpy(), return_inverse=return_inverse)
    if not return_inverse:
        return torch.from_numpy(out)
    return torch.from_numpy(out[0]), torch.from_numpy(out[1]).reshape(t.shape)


def _nearest_index(src: int, dst: int) -> torch.Tensor:
    """Source index of each of ``dst`` outputs: the pixel whose centre is nearest (PIL's NEAREST,
    torch's "nearest-exact"). Label maps are resampled by indexing, so any integer dtype works."""
    return ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst)).floor().long().clamp_(max=src - 1)


def resize(sample: Sample, size: Tuple[int, int]) -> Sample:
    """Image bilinearly (antialiased when shrinking), label maps by nearest neighbour, to ``size`` (h, w)."""
    h, w = sample["image"].shape[-2:]
    if (h, w) == tuple(size):
        return sample
    out = dict(sample)
    out["image"] = F.interpolate(sample["image"][None], size=size, mode="bilinear", align_corners=False,
                                 antialias=size[0] < h or size[1] < w)[0].clamp_(0, 1)
    ys, xs = _nearest_index(h, size[0]), _nearest_index(w, size[1])
    for k in LABEL_MAPS:
        if k in sample:
            out[k] = sample[k][..., ys[:, None], xs[None, :]]
    return out


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """(h, w) scaled so the shorter side is ``short``, then shrunk so the longer is at most ``max_size``."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def crop(sample: Sample, y0: int, x0: int, h: int, w: int) -> Sample:
    out = dict(sample)
    for k in ("image", *LABEL_MAPS):
        if k in sample:
            out[k] = sample[k][..., y0:y0 + h, x0:x0 + w]
    return out


def flip(sample: Sample) -> Sample:
    out = dict(sample)
    for k in ("image", *LABEL_MAPS):
        if k in sample:
            out[k] = sample[k].flip(-1)
    return out


def pad_to(sample: Sample, size: Tuple[int, int], ignore_label: int) -> Sample:
    """Pad bottom/right to ``size``: image with 0, sem_seg with the ignore label, pan_seg with void."""
    h, w = sample["image"].shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == pw == 0:
        return sample
    out = dict(sample)
    for k in ("image", *LABEL_MAPS):
        if k in sample:
            out[k] = F.pad(sample[k], (0, pw, 0, ph), value=FILL.get(k, ignore_label))
    return out


def add_targets(sample: Sample, ignore_label: int = 255) -> Sample:
    """``labels``/``masks`` from the maps: one mask per non-crowd instance with pixels left when the
    sample has an instance stack (``inst_masks``), one per non-crowd segment present in ``pan_seg``
    when it is panoptic (``segments`` shrinks to the segments still present), else one per class
    present in ``sem_seg`` (ignore pixels belong to no mask)."""
    out = dict(sample)
    if "inst_masks" in sample:
        masks = sample["inst_masks"]
        keep = ~sample["inst_iscrowd"] & masks.flatten(1).any(1)
        out["labels"] = sample["inst_labels"][keep]
        out["masks"] = masks[keep]
    elif "pan_seg" in sample:
        present = set(unique(sample["pan_seg"]).tolist())
        out["segments"] = [s for s in sample["segments"] if s["id"] in present]
        kept = [s for s in out["segments"] if not s.get("iscrowd", 0)]
        ids = torch.tensor([s["id"] for s in kept], dtype=torch.int64)
        out["labels"] = torch.tensor([s["category_id"] for s in kept], dtype=torch.int64)
        out["masks"] = sample["pan_seg"][None] == ids[:, None, None]
    else:
        classes = unique(sample["sem_seg"])
        classes = classes[classes != ignore_label]
        out["labels"] = classes.long()
        out["masks"] = sample["sem_seg"][None] == classes[:, None, None]
    return out


class ResizeShortestEdge:
    """Shorter side to one of ``sizes`` (drawn uniformly), longer side at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, sample: Sample) -> Sample:
        short = self.sizes[torch.randint(len(self.sizes), ()).item()]
        return resize(sample, shortest_edge_size(*sample["image"].shape[-2:], short, self.max_size))


class RandomCropCategoryArea:
    """A random ``size`` crop (clipped to the image), re-drawn up to 10 times until it holds at least
    two labelled classes and none covers ``max_ratio`` or more of its labelled pixels; the last draw
    is kept when none qualifies. ``max_ratio >= 1`` disables the check."""

    def __init__(self, size: Tuple[int, int], max_ratio: float, ignore_label: int):
        self.size, self.max_ratio, self.ignore_label = size, max_ratio, ignore_label

    def _acceptable(self, sem: torch.Tensor) -> bool:
        counts = torch.bincount(sem[sem != self.ignore_label])  # labels are small ints: a histogram
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max().item() < self.max_ratio * counts.sum().item()

    def __call__(self, sample: Sample) -> Sample:
        H, W = sample["image"].shape[-2:]
        h, w = min(self.size[0], H), min(self.size[1], W)
        for _ in range(10 if self.max_ratio < 1.0 else 1):
            y0 = torch.randint(H - h + 1, ()).item()
            x0 = torch.randint(W - w + 1, ()).item()
            if self._acceptable(sample["sem_seg"][y0:y0 + h, x0:x0 + w]):
                break
        return crop(sample, y0, x0, h, w)


def _saturate(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale HSV saturation by ``factor`` (capped at 1) keeping hue and value. With V = max(rgb) and
    hue fixed every channel is affine in S, c = V - (V - c) * S'/S, so no HSV image is materialized."""
    v = img.max(0).values
    spread = v - img.min(0).values  # = S * V
    ratio = torch.where(spread > 0, (v / spread.clamp(min=1e-12)).clamp(max=factor), torch.ones_like(v))
    return v - (v - img) * ratio


class PhotometricDistort:
    """SSD colour augmentation (detectron2's ColorAugSSDTransform) on a [0,1] image, each step with
    probability 1/2: brightness +-32/255, then contrast x[0.5,1.5] either before or after saturation
    x[0.5,1.5] and hue +-36 degrees (OpenCV's +-18 units of 2 degrees)."""

    def _contrast(self, img):
        return (img * _uniform(0.5, 1.5)).clamp(0, 1) if _coin() else img

    def _saturation_hue(self, img):
        if _coin():
            img = _saturate(img, _uniform(0.5, 1.5))
        if _coin():
            img = TF.adjust_hue(img, torch.randint(-18, 19, ()).item() / 180)
        return img

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"]
        if _coin():
            img = (img + _uniform(-32, 32) / 255).clamp(0, 1)
        if _coin():
            img = self._saturation_hue(self._contrast(img))
        else:
            img = self._contrast(self._saturation_hue(img))
        return {**sample, "image": img}


class RandomFlip:
    def __call__(self, sample: Sample) -> Sample:
        return flip(sample) if _coin() else sample


class PadTo:
    def __init__(self, size: Tuple[int, int], ignore_label: int):
        self.size, self.ignore_label = size, ignore_label

    def __call__(self, sample: Sample) -> Sample:
        return pad_to(sample, self.size, self.ignore_label)


class Compose:
    """Apply ``steps`` in order, then derive the targets from the transformed maps."""

    def __init__(self, steps: List[Callable[[Sample], Sample]], ignore_label: int):
        self.steps, self.ignore_label = steps, ignore_label

    def __call__(self, sample: Sample) -> Sample:
        for step in self.steps:
            sample = step(sample)
        return add_targets(sample, self.ignore_label)

    def __repr__(self) -> str:
        return f"Compose({[type(s).__name__ for s in self.steps]})"


def _pair(size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def train_scales(min_scale: float, max_scale: float, step: float = 0.1) -> List[float]:
    """The official discrete scale set: min_scale, min_scale + 0.1, ..., max_scale."""
    n = int(math.floor((max_scale - min_scale) / step + 1e-6))
    return [min_scale + i * step for i in range(n + 1)]


def build_transforms(cfg, train: bool) -> Callable[[Sample], Sample]:
    """The sample transform for ``cfg`` (a DataConfig: crop_size, min_scale, max_scale,
    max_single_class_ratio, flip, color_jitter, ignore_label, test_size, test_max_size; optional
    base_size (default: the crop's longer side, 512 for ADE20K, 1024 for Cityscapes) and
    train_max_size (default 4 x base_size))."""
    ignore = int(cfg.ignore_label)
    if not train:
        test_size = int(getattr(cfg, "test_size", 0) or 0)
        steps = [ResizeShortestEdge([test_size], int(getattr(cfg, "test_max_size", 0) or 10 ** 9))] if test_size else []
        return Compose(steps, ignore)
    crop_size = _pair(cfg.crop_size)
    base = int(getattr(cfg, "base_size", 0) or max(crop_size))
    max_size = int(getattr(cfg, "train_max_size", 0) or 4 * base)
    sizes = [int(base * s) for s in train_scales(cfg.min_scale, cfg.max_scale)]
    steps: List[Callable[[Sample], Sample]] = [ResizeShortestEdge(sizes, max_size),
                                                RandomCropCategoryArea(crop_size, cfg.max_single_class_ratio, ignore)]
    if cfg.color_jitter:
        steps.append(PhotometricDistort())
    if cfg.flip:
        steps.append(RandomFlip())
    steps.append(PadTo(crop_size, ignore))
    return Compose(steps, ignore)


__all__ = ["add_targets", "build_transforms", "Compose", "PadTo", "PhotometricDistort", "RandomCropCategoryArea",
           "RandomFlip", "unique", "ResizeShortestEdge", "resize", "shortest_edge_size", "train_scales"]
