"""Batching samples of different sizes: zero-pad to a common size that is a multiple of
``size_divisibility`` (what the backbone's strides need), and keep each image's true size."""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch


def _pad(t: torch.Tensor, hw, value) -> torch.Tensor:
    """``t`` [..., h, w] placed at the top-left of a [..., H, W] tensor filled with ``value``."""
    out = t.new_full((*t.shape[:-2], *hw), value)
    out[..., : t.shape[-2], : t.shape[-1]] = t
    return out


def collate(samples: Sequence[Dict], size_divisibility: int = 32, ignore_label: int = 255) -> Dict:
    """Stack samples into a padded batch.

    Returns a dict with ``images`` [B,3,Hp,Wp] (zero-padded), ``image_sizes`` [(H,W)] per image,
    ``targets`` [{"labels", "masks" [N,Hp,Wp] zero-padded}], ``sem_seg`` [B,Hp,Wp] padded with
    ``ignore_label``, ``pan_seg`` [B,Hp,Wp] padded with 0 (void) and ``segments`` when every
    sample has them, and ``files`` / ``image_ids`` / ``orig_sizes`` when every sample has a
    ``file`` / ``image_id`` / ``orig_size``.
    """
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got an empty batch")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility: expected >= 1, got {size_divisibility}")
    sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    hw = tuple(math.ceil(max(d) / size_divisibility) * size_divisibility for d in zip(*sizes))
    batch: Dict = {
        "images": torch.stack([_pad(s["image"], hw, 0.0) for s in samples]),
        "image_sizes": sizes,
        "targets": [{"labels": s["labels"], "masks": _pad(s["masks"], hw, False)} for s in samples],
        "sem_seg": torch.stack([_pad(s["sem_seg"], hw, ignore_label) for s in samples]),
    }
    if all("pan_seg" in s for s in samples):
        batch["pan_seg"] = torch.stack([_pad(s["pan_seg"], hw, 0) for s in samples])
        batch["segments"] = [s["segments"] for s in samples]
    for key in ("file", "image_id", "orig_size"):  # per-image facts, kept as lists
        if all(key in s for s in samples):
            batch[key + "s"] = [s[key] for s in samples]
    return batch
