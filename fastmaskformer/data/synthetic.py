"""A procedural segmentation dataset of textured "stuff" regions and "thing" shapes, drawn on the fly.

Each image is a pure function of (seed, split, index): a Voronoi partition of the canvas into
stuff regions (sky, grass, water, wall: each its own colour and texture), with 1-5 thing
instances painted on top in random order (ball, box, tent, ring: each its own shape, colour and
texture), so later instances occlude earlier ones and every class is recognizable from its
appearance. Small per-instance colour jitter and pixel noise keep it from being a colour lookup.
Samples follow the package-wide format (see ``fastmaskformer.data``), with semantic and panoptic
annotations.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _flat(xx, yy, rng):
    return np.zeros(xx.shape)


def _gradient(xx, yy, rng):
    return 0.25 * yy / yy.shape[0] - 0.12


def _speckle(xx, yy, rng):
    return rng.normal(0.0, 0.12, xx.shape)


def _waves(xx, yy, rng):
    return 0.12 * np.sin(0.6 * xx + 0.25 * yy + rng.uniform(0, 2 * np.pi))


def _bricks(xx, yy, rng):
    mortar = (yy % 8 < 2) | (((xx + 8 * (yy // 8 % 2)) % 16) < 2)
    return np.where(mortar, 0.3, 0.0)


def _checker(xx, yy, rng):
    return np.where(((xx // 4) + (yy // 4)) % 2 == 0, 0.12, -0.12)


def _stripes(xx, yy, rng):
    return np.where(xx % 6 < 3, -0.2, 0.0)


def _radial(cx, cy, r):
    def shade(xx, yy, rng):
        return -0.3 * np.clip(np.hypot(xx - cx, yy - cy) / max(r, 1.0), 0, 1)
    return shade


def _circle(xx, yy, cx, cy, r):
    return np.hypot(xx - cx, yy - cy) <= r


def _box(xx, yy, cx, cy, r):
    return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)


def _tent(xx, yy, cx, cy, r):
    # Apex at the top; the half-width grows linearly to r at the base.
    return (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)


def _ring(xx, yy, cx, cy, r):
    d = np.hypot(xx - cx, yy - cy)
    return (d <= r) & (d >= 0.55 * r)


# (name, RGB colour, texture); stuff first so that the class id says stuff or thing.
STUFF: List[Tuple[str, Tuple[float, float, float], Texture]] = [
    ("sky", (0.45, 0.65, 0.95), _gradient),
    ("grass", (0.20, 0.55, 0.20), _speckle),
    ("water", (0.10, 0.30, 0.55), _waves),
    ("wall", (0.55, 0.30, 0.25), _bricks),
]
THINGS = [
    ("ball", (0.95, 0.80, 0.10), None, _circle),  # radially shaded (needs the centre)
    ("box", (0.55, 0.20, 0.70), _checker, _box),
    ("tent", (0.90, 0.90, 0.90), _stripes, _tent),
    ("ring", (0.95, 0.40, 0.10), _flat, _ring),
]


class SyntheticDataset(Dataset):
    """Procedural things-and-stuff images, deterministic by ``seed``, ``split`` and index.

    Args:
        split: "train" or any other name (the validation images); the two never coincide.
        length: number of images.
        image_size: side of the square images.
        seed: with the split and the index, determines each image.
        task: "semantic" gives one mask per present class, "panoptic" one per segment (each
            thing instance, each present stuff class); both carry sem_seg, pan_seg and segments.
    """

    class_names = [s[0] for s in STUFF] + [t[0] for t in THINGS]
    num_classes = len(class_names)
    thing_classes = list(range(len(STUFF), len(STUFF) + len(THINGS)))

    def __init__(self, split: str = "train", length: int = 1000, image_size: int = 128, seed: int = 0,
                 task: str = "semantic"):
        if task not in ("semantic", "panoptic"):
            raise ValueError(f"task: expected 'semantic' or 'panoptic', got {task!r}")
        if length < 0 or image_size < 16:
            raise ValueError(f"length >= 0 and image_size >= 16 expected, got {length} and {image_size}")
        self.split, self.length, self.size, self.seed, self.task = split, length, image_size, seed, task
        self._split_code = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        rng = np.random.default_rng([self.seed, self._split_code, index])
        image, sem, pan, segments = self._draw(rng)
        if self.task == "semantic":
            labels = np.unique(sem)
            masks = sem[None] == labels[:, None, None]
        else:
            labels = np.array([s["category_id"] for s in segments], dtype=np.int64)
            masks = pan[None] == np.array([s["id"] for s in segments])[:, None, None]
        return dict(
            image=torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)),
            labels=torch.from_numpy(labels.astype(np.int64)),
            masks=torch.from_numpy(masks.reshape(-1, self.size, self.size)),
            sem_seg=torch.from_numpy(sem.astype(np.int64)),
            pan_seg=torch.from_numpy(pan.astype(np.int64)),
            segments=segments,
            file=f"synthetic_{self.split}_{index:06d}",
        )

    def _draw(self, rng: np.random.Generator):
        S = self.size
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
        image = np.zeros((S, S, 3))
        sem = np.zeros((S, S), dtype=np.int64)

        # Stuff: Voronoi cells with wavy borders (the coordinates are warped by a sinusoid).
        k = int(rng.integers(2, 5))
        seeds = rng.uniform(0, S, (k, 2))
        wx = xx + 0.06 * S * np.sin(yy * rng.uniform(0.05, 0.15))
        wy = yy + 0.06 * S * np.sin(xx * rng.uniform(0.05, 0.15))
        cell = np.argmin((wx[None] - seeds[:, 0, None, None]) ** 2 + (wy[None] - seeds[:, 1, None, None]) ** 2, 0)
        for c, cls in enumerate(rng.integers(0, len(STUFF), k)):
            self._paint(image, sem, cell == c, int(cls), STUFF[cls][1], STUFF[cls][2], xx, yy, rng)

        # Things: painted in order, so instance ids of occluded parts are overwritten.
        inst = np.zeros((S, S), dtype=np.int64)
        n = int(rng.integers(1, 6))
        for i in range(n):
            t = int(rng.integers(0, len(THINGS)))
            r = rng.uniform(0.08, 0.2) * S
            cx, cy = rng.uniform(r / 2, S - r / 2, 2)
            _, colour, texture, shape = THINGS[t]
            region = shape(xx, yy, cx, cy, r)
            self._paint(image, sem, region, len(STUFF) + t, colour, texture or _radial(cx, cy, r), xx, yy, rng)
            inst[region] = i + 1
        image = np.clip(image + rng.normal(0.0, 0.03, image.shape), 0.0, 1.0)

        # Panoptic: one segment per present stuff class, one per visible thing instance; id 0 = void.
        pan = np.zeros((S, S), dtype=np.int64)
        segments = []
        for cls in np.unique(sem[inst == 0]):
            segments.append({"id": len(segments) + 1, "category_id": int(cls), "isthing": False})
            pan[(inst == 0) & (sem == cls)] = len(segments)
        for i in np.unique(inst[inst > 0]):
            region = inst == i
            segments.append({"id": len(segments) + 1, "category_id": int(sem[region][0]), "isthing": True})
            pan[region] = len(segments)
        return image, sem, pan, segments

    @staticmethod
    def _paint(image, sem, region, cls, colour, texture, xx, yy, rng):
        jitter = rng.uniform(-0.06, 0.06, 3)
        tex = texture(xx, yy, rng)[region]
        image[region] = np.clip(np.asarray(colour) + jitter + tex[:, None], 0.0, 1.0)
        sem[region] = cls
