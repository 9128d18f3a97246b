"""ADE20K SceneParsing (ADEChallengeData2016, 150 classes) in its released layout.

Annotation PNGs hold 0 for "other" (ignored) and 1..150 for the classes, mapped to 0..149.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from ._base import (IGNORE_LABEL, DatasetError, MissingDataError, SegmentationDataset, check_layout, check_split,
                    read_image, read_label_map)

LAYOUT = """\
<root>/ADEChallengeData2016/        (or <root> itself)
    images/training/ADE_train_00000001.jpg ...
    images/validation/ADE_val_00000001.jpg ...
    annotations/training/ADE_train_00000001.png ...
    annotations/validation/ADE_val_00000001.png ..."""

# The 150 SceneParsing classes in label order (first synonym of each official name).
CLASS_NAMES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "window", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "tub", "rail", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "street lamp", "booth", "tv", "plane", "dirt track", "clothes", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "pool", "stool", "barrel", "basket", "falls", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "trash can", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]
# The 100 thing classes of the ADE20K-150 panoptic split (MaskFormer's metadata); the rest are stuff.
THING_CLASSES = [
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47, 49,
    50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88,
    89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124, 125,
    126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
]

# PNG value -> contiguous id: 0 ("other") -> ignore, k -> k - 1.
_LUT = torch.cat([torch.tensor([IGNORE_LABEL]), torch.arange(150), torch.full((105,), IGNORE_LABEL)])


class ADE20KDataset(SegmentationDataset):
    """Semantic samples: image, sem_seg (ignore 255), one mask per class present."""

    num_classes = 150
    class_names = CLASS_NAMES
    thing_classes = THING_CLASSES
    stuff_classes = [c for c in range(150) if c not in set(THING_CLASSES)]

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable[[Dict], Dict]] = None):
        super().__init__(transform)
        folder = check_split(split, {"train": "training", "val": "validation"}, "ADE20K")
        if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
            root = os.path.join(root, "ADEChallengeData2016")
        image_dir, ann_dir = (os.path.join("images", folder), os.path.join("annotations", folder))
        check_layout(root, [image_dir, ann_dir], LAYOUT, "ADE20K")
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(root, image_dir)) if f.endswith(".jpg"))
        if not stems:
            raise MissingDataError(f"ADE20K: no .jpg images in {os.path.join(root, image_dir)}")
        self.records = [(os.path.join(root, image_dir, s + ".jpg"), os.path.join(root, ann_dir, s + ".png"))
                        for s in stems]

    def load(self, record) -> Dict:
        image_path, ann_path = record
        raw = read_label_map(ann_path)
        if raw.numel() and int(raw.max()) > 150:
            raise DatasetError(f"{ann_path}: ADE20K labels lie in [0, 150], got {int(raw.max())}")
        return {"image": read_image(image_path), "sem_seg": _LUT[raw], "file": image_path}
