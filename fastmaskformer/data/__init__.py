"""Datasets and batching.

Every dataset yields samples of one format: ``image`` float32 [3,H,W] RGB in [0,1]; ``labels``
int64 [N]; ``masks`` bool [N,H,W] (one per segment; for semantic datasets one per present class);
``sem_seg`` int64 [H,W] with the ignore label (255) where unannotated; for panoptic data
``pan_seg`` int64 [H,W] (segment id per pixel, 0 = void) and ``segments`` (a list of
``{"id", "category_id", "isthing"}``); for instance data ``inst_masks`` bool [N,H,W],
``inst_labels``, ``inst_iscrowd``, ``image_id`` and ``orig_size``; optionally ``file``. Dataset
classes carry ``num_classes``, ``class_names`` and ``thing_classes`` (category ids of things).
"""
from __future__ import annotations

from ..config import ConfigError
from ._base import DatasetError, MissingDataError
from .collate import collate
from .synthetic import SyntheticDataset

# name -> (module, class); the real readers are imported only when asked for.
_READERS = {
    "ade20k": ("ade20k", "ADE20KDataset"),
    "coco_panoptic": ("coco_panoptic", "COCOPanopticDataset"),
    "coco_instance": ("coco_instance", "COCOInstanceDataset"),
    "cityscapes": ("cityscapes", "CityscapesDataset"),
}


def build_dataset(cfg, split: str):
    """The dataset named by ``cfg.name`` (a :class:`fastmaskformer.config.DataConfig`) for ``split``;
    training-time augmentation applies when ``split == cfg.train_split``."""
    train = split == cfg.train_split
    if cfg.name == "synthetic":
        return SyntheticDataset(split="train" if train else split, image_size=cfg.image_size, seed=cfg.seed,
                                length=cfg.train_length if train else cfg.val_length, task=cfg.task)
    if cfg.name not in _READERS:
        raise ConfigError(f"data.name: expected one of {['synthetic', *_READERS]}, got {cfg.name!r}")
    import importlib

    from .transforms import build_transforms

    module, cls = _READERS[cfg.name]
    reader = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    if cfg.name == "cityscapes":  # semantic by default; panoptic targets from the instanceIds maps
        return reader(cfg.root, split, build_transforms(cfg, train), panoptic=cfg.task == "panoptic")
    return reader(cfg.root, split, build_transforms(cfg, train))


__all__ = ["DatasetError", "MissingDataError", "SyntheticDataset", "build_dataset", "collate"]
