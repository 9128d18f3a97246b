"""Cityscapes (gtFine, 19 evaluation classes) in its released layout.

``*_gtFine_labelIds.png`` holds the 34 label ids of cityscapesScripts' labels.py; the 19 evaluated
ones map to train ids 0..18 and every other id (void, ego vehicle, caravan, trailer, license plate,
...) to the ignore label. With ``panoptic=True`` the ``*_gtFine_instanceIds.png`` maps give segments
too: a value >= 1000 is one instance (label id = value // 1000); a smaller value is a whole class
region, a crowd region when that class has instances (cityscapesScripts' panoptic convention).
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Dict, Optional

import torch

from ._base import (IGNORE_LABEL, DatasetError, MissingDataError, SegmentationDataset, check_layout, check_split,
                    read_image, read_label_map)
from .transforms import unique

LAYOUT = """\
<root>/
    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png   (panoptic=True only)"""

CLASS_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
# label id of each train id 0..18 (labels.py)
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
THING_CLASSES = list(range(11, 19))  # person ... bicycle: the classes with instances

_LUT = torch.full((256,), IGNORE_LABEL, dtype=torch.int64)
_LUT[LABEL_IDS] = torch.arange(19)
_IMAGE_SUFFIX = "_leftImg8bit.png"


class CityscapesDataset(SegmentationDataset):
    """Semantic samples (sem_seg in train ids, one mask per class present); with ``panoptic=True``
    also pan_seg (the instanceIds values of evaluated classes, 0 elsewhere) and segments, with one
    mask per non-crowd segment."""

    num_classes = 19
    class_names = CLASS_NAMES
    thing_classes = THING_CLASSES
    stuff_classes = list(range(11))

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable[[Dict], Dict]] = None,
                 panoptic: bool = False):
        super().__init__(transform)
        split = check_split(split, {"train": "train", "val": "val"}, "Cityscapes")
        image_dir, gt_dir = os.path.join("leftImg8bit", split), os.path.join("gtFine", split)
        check_layout(root, [image_dir, gt_dir], LAYOUT, "Cityscapes")
        images = sorted(glob.glob(os.path.join(root, image_dir, "*", "*" + _IMAGE_SUFFIX)))
        if not images:
            raise MissingDataError(f"Cityscapes: no *{_IMAGE_SUFFIX} files in {os.path.join(root, image_dir)}/<city>/")
        self.panoptic = panoptic
        self.records = []
        for path in images:
            city = os.path.basename(os.path.dirname(path))
            stem = os.path.join(root, gt_dir, city, os.path.basename(path)[: -len(_IMAGE_SUFFIX)] + "_gtFine_")
            self.records.append((path, stem + "labelIds.png", stem + "instanceIds.png"))

    def load(self, record) -> Dict:
        image_path, label_path, instance_path = record
        label_ids = read_label_map(label_path)
        if label_ids.numel() and (int(label_ids.min()) < 0 or int(label_ids.max()) > 255):
            raise DatasetError(f"{label_path}: label ids must lie in [0, 255], got [{int(label_ids.min())}, "
                             f"{int(label_ids.max())}]")
        sample = {"image": read_image(image_path), "sem_seg": _LUT[label_ids], "file": image_path}
        if self.panoptic:
            sample.update(self._panoptic(read_label_map(instance_path), instance_path))
        return sample

    def _panoptic(self, values: torch.Tensor, path: str) -> Dict:
        ids = unique(values)
        label_of = torch.where(ids >= 1000, ids // 1000, ids)
        if len(ids) and int(label_of.max()) > 255:
            raise DatasetError(f"{path}: instance value {int(ids[label_of.argmax()])} decodes to an unknown label id")
        train_of = _LUT[label_of]
        segments = [{"id": int(v), "category_id": int(c), "isthing": int(c) in THING_CLASSES,
                     "iscrowd": int(v < 1000 and int(c) in THING_CLASSES)}
                    for v, c in zip(ids.tolist(), train_of.tolist()) if c != IGNORE_LABEL]
        kept = torch.tensor([s["id"] for s in segments], dtype=torch.int64)
        return {"pan_seg": torch.where(torch.isin(values, kept), values, 0), "segments": segments}
