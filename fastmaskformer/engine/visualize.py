"""A picture of what the model learned: rows of image | ground truth | prediction."""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def palette(num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3] colours spread around the hue circle (golden-ratio steps, so that
    neighbouring ids differ), alternating two lightness levels."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95 if i % 2 else 0.7)]
                     for i, h in enumerate(hues)], dtype=np.uint8).reshape(-1, 3)


def colorize(seg: torch.Tensor, num_classes: int) -> np.ndarray:
    """uint8 [H,W,3] of a class map; labels outside [0, num_classes) (ignore) are black."""
    seg = seg.cpu().numpy()
    out = np.zeros((*seg.shape, 3), dtype=np.uint8)
    valid = (seg >= 0) & (seg < num_classes)
    out[valid] = palette(num_classes)[seg[valid]]
    return out


def legend(class_names: Sequence[str], width: int, row_height: int = 14) -> np.ndarray:
    """uint8 [h, width, 3]: a colour swatch and the name of every class, as many per line as fit."""
    per_line = max(1, width // 110)
    lines = -(-len(class_names) // per_line)
    img = Image.new("RGB", (width, lines * row_height + 2), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, colour) in enumerate(zip(class_names, palette(len(class_names)))):
        x, y = (k % per_line) * 110 + 2, (k // per_line) * row_height + 2
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(c) for c in colour))
        draw.text((x + 14, y), str(name)[:15], fill="black")
    return np.asarray(img)


def save_comparison(path: str, images: Sequence[torch.Tensor], gts: Sequence[torch.Tensor],
                    preds: Sequence[torch.Tensor], num_classes: int, gap: int = 4,
                    class_names: Optional[Sequence[str]] = None) -> None:
    """Write a PNG with one row per image: the RGB image [3,H,W] in [0,1], its ground-truth class map
    and the predicted one ([H,W] each), separated by ``gap`` white pixels; with ``class_names``, a
    colour legend below."""
    rows = []
    for img, gt, pred in zip(images, gts, preds):
        rgb = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        panels = [rgb, colorize(gt, num_classes), colorize(pred, num_classes)]
        white = np.full((rgb.shape[0], gap, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([panels[0], white, panels[1], white, panels[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    if class_names is not None:
        padded.append(legend(class_names, width))
    Image.fromarray(np.concatenate(padded, axis=0)).save(path)
