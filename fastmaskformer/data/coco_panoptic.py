"""COCO panoptic (2017) in its released layout: a JSON of per-image segment lists and PNGs whose RGB
colour encodes the segment id (id = R + 256 G + 256^2 B, 0 = void).

Categories become contiguous ids in the order of the JSON's "categories" list (the official file
lists the 80 things, then the 53 stuff classes), with their "isthing" flags. Crowd segments stay in
``pan_seg``/``segments`` (evaluation needs them) and in ``sem_seg``, but get no training mask.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import torch

from ._base import IGNORE_LABEL, DatasetError, SegmentationDataset, check_layout, check_split, read_array, read_image
from .transforms import unique

LAYOUT = """\
<root>/
    annotations/panoptic_train2017.json   annotations/panoptic_val2017.json
    panoptic_train2017/*.png              panoptic_val2017/*.png
    train2017/*.jpg                       val2017/*.jpg"""

# The official 133 categories in the panoptic JSON's order: 80 things, then 53 stuff.
CLASS_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit",
    "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river",
    "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "window-blind", "window-other", "tree-merged", "fence-merged",
    "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged",
    "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged",
    "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
]


def rgb_to_id(rgb: torch.Tensor) -> torch.Tensor:
    """[H,W,3] uint8 colours -> int64 segment ids R + 256 G + 256^2 B."""
    rgb = rgb.long()
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


class COCOPanopticDataset(SegmentationDataset):
    """Panoptic samples: image, pan_seg, segments ({"id","category_id","isthing","iscrowd"}), sem_seg,
    one mask per non-crowd segment. Class attributes describe the official 133 categories; an
    instance's ``num_classes``/``class_names``/``thing_classes`` are read from its JSON."""

    num_classes = 133
    class_names = CLASS_NAMES
    thing_classes = list(range(80))
    stuff_classes = list(range(80, 133))

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable[[Dict], Dict]] = None):
        super().__init__(transform)
        year_split = check_split(split, {"train": "train2017", "val": "val2017"}, "COCO panoptic")
        json_path = os.path.join("annotations", f"panoptic_{year_split}.json")
        check_layout(root, [json_path, f"panoptic_{year_split}", year_split], LAYOUT, "COCO panoptic")
        json_path = os.path.join(root, json_path)
        try:
            with open(json_path) as f:
                meta = json.load(f)
            categories, images, annotations = meta["categories"], meta["images"], meta["annotations"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise DatasetError(f"{json_path}: not a COCO panoptic JSON ({type(e).__name__}: {e})") from e
        self.contiguous = {c["id"]: i for i, c in enumerate(categories)}
        self.num_classes = len(categories)
        self.class_names = [c["name"] for c in categories]
        self.thing_classes = [i for i, c in enumerate(categories) if c.get("isthing", 0)]
        self.stuff_classes = [i for i, c in enumerate(categories) if not c.get("isthing", 0)]
        self._things = set(self.thing_classes)
        image_files = {im["id"]: im["file_name"] for im in images}
        missing = [a["image_id"] for a in annotations if a["image_id"] not in image_files]
        if missing:
            raise DatasetError(f"{json_path}: annotations refer to image ids {missing[:5]} absent from its images list")
        self.records = [(os.path.join(root, year_split, image_files[a["image_id"]]),
                         os.path.join(root, f"panoptic_{year_split}", a["file_name"]), a["segments_info"])
                        for a in sorted(annotations, key=lambda a: a["file_name"])]

    def _segments(self, infos: List[Dict], ann_path: str) -> List[Dict]:
        out = []
        for s in infos:
            if s["category_id"] not in self.contiguous:
                raise DatasetError(f"{ann_path}: segment {s['id']} has category_id {s['category_id']}, which is not "
                                 "in the JSON's categories")
            cat = self.contiguous[s["category_id"]]
            out.append({"id": int(s["id"]), "category_id": cat, "isthing": cat in self._things,
                        "iscrowd": int(s.get("iscrowd", 0))})
        return out

    def load(self, record) -> Dict:
        image_path, ann_path, infos = record
        rgb = read_array(ann_path, "RGB")
        pan_seg = rgb_to_id(torch.from_numpy(rgb.copy()))
        segments = self._segments(infos, ann_path)
        category = {s["id"]: s["category_id"] for s in segments}
        ids, where = unique(pan_seg, return_inverse=True)
        unknown = [i for i in ids.tolist() if i != 0 and i not in category]
        if unknown:
            raise DatasetError(f"{ann_path}: segment ids {unknown[:5]} appear in the PNG but not in the JSON's "
                             "segments_info")
        sem_seg = torch.tensor([category.get(i, IGNORE_LABEL) for i in ids.tolist()], dtype=torch.int64)[where]
        return {"image": read_image(image_path), "sem_seg": sem_seg, "pan_seg": pan_seg, "segments": segments,
                "file": image_path}
