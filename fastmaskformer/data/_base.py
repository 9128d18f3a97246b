"""What the on-disk dataset readers share: file decoding with errors that name the file, the layout
check that shows the expected folders, and the load -> transform -> targets flow of ``__getitem__``."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..config import UserError
from .transforms import add_targets

IGNORE_LABEL = 255


class DatasetError(UserError, ValueError):
    """A dataset file that cannot be decoded or that contradicts its format or annotations."""


class MissingDataError(UserError, FileNotFoundError):
    """A dataset root, folder or file that is not where the layout puts it."""


def read_array(path: str, mode: Optional[str] = None) -> np.ndarray:
    """Decode an image file fully (PIL opens lazily: truncated data only fails on load) into an array,
    converted to ``mode`` when given; a missing or undecodable file raises an error naming it."""
    if not os.path.isfile(path):
        raise MissingDataError(f"missing file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode) if mode and im.mode != mode else im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode {path}: {e}") from e


def read_image(path: str) -> torch.Tensor:
    """RGB image as float32 [3,H,W] in [0,1]."""
    return torch.from_numpy(read_array(path, "RGB").copy()).permute(2, 0, 1).float().div_(255)


def read_label_map(path: str) -> torch.Tensor:
    """Single-channel PNG (8-bit, 16-bit or 32-bit) as int64 [H,W]."""
    arr = read_array(path)
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel label PNG, got an array of shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64))


def check_layout(root: str, required: Sequence[str], layout: str, dataset: str) -> None:
    """Raise FileNotFoundError showing ``layout`` when ``root`` or any ``required`` sub-path is missing."""
    missing = [p for p in [""] + list(required) if not os.path.exists(os.path.join(root, p))]
    if missing:
        what = root if missing[0] == "" else os.path.join(root, missing[0])
        raise MissingDataError(f"{dataset}: {what} does not exist. Expected this layout under the dataset "
                                f"root:\n{layout}")


def check_split(split: str, splits: Dict[str, str], dataset: str) -> str:
    if split not in splits:
        raise DatasetError(f"{dataset}: split must be one of {sorted(splits)}, got {split!r}")
    return splits[split]


class SegmentationDataset(Dataset):
    """Base of the on-disk readers: subclasses list their records in ``self.records`` and decode one
    record into a sample (image, sem_seg, and pan_seg + segments when panoptic) in ``load``."""

    num_classes: int
    class_names: List[str]
    thing_classes: List[int]
    stuff_classes: List[int]

    def __init__(self, transform: Optional[Callable[[Dict], Dict]] = None):
        self.transform = transform
        self.records: List = []

    def load(self, record) -> Dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict:
        sample = self.load(self.records[index])
        h, w = sample["image"].shape[-2:]
        for k in ("sem_seg", "pan_seg"):
            if k in sample and tuple(sample[k].shape) != (h, w):
                raise DatasetError(f"{sample['file']}: annotation {k} has size {tuple(sample[k].shape)}, "
                                 f"the image {(h, w)}")
        # The transform ends by deriving the targets itself; without one, derive them here.
        return self.transform(sample) if self.transform is not None else add_targets(sample, IGNORE_LABEL)
