"""Backbones: timm models exposing the res2..res5 feature maps (strides 4, 8, 16, 32).

A :class:`Backbone` maps images [B, 3, H, W] (H, W multiples of 32) to ``{"res2": ..., "res5": ...}``
NCHW feature maps and describes them in ``feature_info`` (channels and stride per name), which is
what the pixel decoder is built from. Weights are random unless ``pretrained`` names a local file;
nothing is ever downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import timm
import torch
from torch import nn

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


@dataclass(frozen=True)
class FeatureSpec:
    channels: int
    stride: int


@dataclass(frozen=True)
class _Recipe:
    out_indices: Tuple[int, ...]
    # timm's Swin returns NHWC maps; the official MaskFormer Swin also LayerNorms every output.
    channels_last: bool = False
    kwargs: Tuple[Tuple[str, object], ...] = ()


# Swin: strict_img_size=False accepts any multiple of 32 (the attention masks are built per input
# size), and always_partition=True keeps the 7x7 windows and their shifts at every stage whatever
# the input size, as the official Swin does, so that the weights do not depend on the input size.
_SWIN = _Recipe((0, 1, 2, 3), channels_last=True, kwargs=(("strict_img_size", False), ("always_partition", True)))
BACKBONES: Dict[str, _Recipe] = {
    "resnet18": _Recipe((1, 2, 3, 4)),
    "resnet50": _Recipe((1, 2, 3, 4)),
    "resnet101": _Recipe((1, 2, 3, 4)),
    "swin_tiny_patch4_window7_224": _SWIN,
}
ALIASES = {"swin_t": "swin_tiny_patch4_window7_224", "swin_tiny": "swin_tiny_patch4_window7_224"}


class Backbone(nn.Module):
    """A timm feature extractor returning NCHW ``res2..res5`` maps.

    Args:
        name: one of :data:`BACKBONES` (or an alias in :data:`ALIASES`).
        pretrained: path of a local ``.pth``/``.safetensors`` state dict of the timm model (the
            classifier, if present, is dropped); None for random initialization.
    """

    def __init__(self, name: str = "resnet50", pretrained: Optional[str] = None):
        super().__init__()
        name = ALIASES.get(name, name)
        if name not in BACKBONES:
            raise ValueError(f"backbone: expected one of {sorted(BACKBONES) + sorted(ALIASES)}, got {name!r}")
        recipe = BACKBONES[name]
        load = dict(pretrained=False)
        if pretrained is not None:
            path = os.fspath(pretrained)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"pretrained: no weights file at {path!r}")
        self.name = name
        try:
            self.body = timm.create_model(name, features_only=True, out_indices=recipe.out_indices,
                                          **load, **dict(recipe.kwargs))
        except TypeError as exc:
            if not recipe.kwargs:
                raise
            raise RuntimeError(f"backbone {name!r} needs a timm that accepts {dict(recipe.kwargs)} "
                               f"(timm >= 1.0.8); this is timm {timm.__version__}: {exc}") from exc
        channels = self.body.feature_info.channels()
        strides = self.body.feature_info.reduction()
        self.feature_info: Dict[str, FeatureSpec] = {
            n: FeatureSpec(c, s) for n, c, s in zip(FEATURE_NAMES, channels, strides)}
        self.channels_last = recipe.channels_last
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels) if recipe.channels_last else None
        if pretrained is not None:  # timm, torchvision, detectron2, fastmaskformer layouts (fastmaskformer.convert)
            from ..convert import load_backbone_weights
            load_backbone_weights(self, path)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(images)
        if self.channels_last:
            feats = [norm(f).permute(0, 3, 1, 2) for norm, f in zip(self.norms, feats)]
        return dict(zip(FEATURE_NAMES, feats))
