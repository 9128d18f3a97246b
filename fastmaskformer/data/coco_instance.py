"""COCO instance segmentation (2017) in its released layout: ``instances_<split>2017.json`` with one
annotation per object, its mask given as polygons or as run-length encoding (RLE: compressed
``counts`` strings, or uncompressed lists for crowd regions), decoded with pycocotools.

Categories become contiguous ids 0..K-1 in increasing COCO category id (the official 80 ids run
1..90 with gaps), all of them things. Instances may overlap, so they travel as a mask stack
(``inst_masks`` [N,H,W], ``inst_labels``, ``inst_iscrowd``) through the augmentation, not as an id
map; ``sem_seg`` paints the non-crowd instances in annotation order (later ones on top), the rest is
ignored. Crowd regions get no training mask. ``image_id`` and ``orig_size`` let the AP evaluator
(``fastmaskformer.evaluation.InstanceEvaluator``) compare predictions with the JSON's annotations.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ._base import IGNORE_LABEL, DatasetError, SegmentationDataset, check_layout, check_split, read_image

LAYOUT = """\
<root>/
    annotations/instances_train2017.json   annotations/instances_val2017.json
    train2017/*.jpg                        val2017/*.jpg"""


def load_coco(json_path: str):
    """A pycocotools ``COCO`` index of ``json_path`` (quietly; it prints progress otherwise)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # an optional dependency: pip install 'fastmaskformer[coco]'
        raise ImportError("COCO instance segmentation needs pycocotools: pip install pycocotools") from e
    try:
        with open(json_path) as f:
            dataset = json.load(f)
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        for key in ("images", "annotations", "categories"):
            if not isinstance(dataset.get(key), list):
                raise KeyError(key)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
        raise DatasetError(f"{json_path}: not a COCO instances JSON ({type(e).__name__}: {e})") from e
    return coco


class COCOInstanceDataset(SegmentationDataset):
    """Instance samples: image, inst_masks / inst_labels / inst_iscrowd (every annotation), sem_seg,
    image_id, orig_size, and the training targets (labels, masks: one per non-crowd instance).
    Class attributes describe the official 80 categories; an instance's are read from its JSON."""

    num_classes = 80
    thing_classes = list(range(80))
    stuff_classes: list = []

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable[[Dict], Dict]] = None):
        super().__init__(transform)
        year_split = check_split(split, {"train": "train2017", "val": "val2017"}, "COCO instances")
        json_path = os.path.join("annotations", f"instances_{year_split}.json")
        check_layout(root, [json_path, year_split], LAYOUT, "COCO instances")
        self.json_path = os.path.join(root, json_path)
        self.coco = load_coco(self.json_path)
        category_ids = sorted(self.coco.cats)
        self.contiguous = {c: i for i, c in enumerate(category_ids)}
        self.category_ids = category_ids  # contiguous id -> COCO category id
        self.num_classes = len(category_ids)
        self.class_names = [self.coco.cats[c]["name"] for c in category_ids]
        self.thing_classes = list(range(self.num_classes))
        self.stuff_classes = []
        unknown = [a["id"] for a in self.coco.anns.values() if a.get("image_id") not in self.coco.imgs]
        if unknown:
            raise DatasetError(f"{self.json_path}: annotations {unknown[:5]} refer to image ids absent from its "
                               "images list")
        self.image_dir = os.path.join(root, year_split)
        self.records = sorted(self.coco.imgs)  # image ids

    def _masks(self, anns, h: int, w: int, where: str) -> torch.Tensor:
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for i, a in enumerate(anns):
            if a.get("category_id") not in self.contiguous:
                raise DatasetError(f"{where}: annotation {a.get('id')} has category_id {a.get('category_id')}, "
                                   "which is not in the JSON's categories")
            try:
                masks[i] = self.coco.annToMask(a).astype(bool)
            except Exception as e:  # a malformed polygon or RLE (pycocotools raises all kinds)
                raise DatasetError(f"{where}: cannot decode the segmentation of annotation {a.get('id')} "
                                   f"({type(e).__name__}: {e})") from e
        return torch.from_numpy(masks)

    def load(self, image_id) -> Dict:
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        image = read_image(path)
        h, w = image.shape[-2:]
        if (info.get("height"), info.get("width")) != (h, w):
            raise DatasetError(f"{path}: the image is {h}x{w}, the JSON says {info.get('height')}x{info.get('width')}")
        anns = sorted(self.coco.imgToAnns[image_id], key=lambda a: a["id"])
        masks = self._masks(anns, h, w, self.json_path)
        labels = torch.tensor([self.contiguous[a["category_id"]] for a in anns], dtype=torch.int64)
        iscrowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
        sem_seg = torch.full((h, w), IGNORE_LABEL, dtype=torch.int64)
        for m, c, crowd in zip(masks, labels, iscrowd):
            if not crowd:
                sem_seg[m] = c
        return {"image": image, "sem_seg": sem_seg, "inst_masks": masks, "inst_labels": labels,
                "inst_iscrowd": iscrowd, "image_id": int(image_id), "orig_size": (h, w), "file": path}
