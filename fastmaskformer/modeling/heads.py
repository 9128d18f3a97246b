"""Prediction heads: per-query class logits and mask logits, for every decoder layer at once.

The mask logits of all L layers come from one ``fastmaskformer.ops.mask_logits`` call on the
stacked mask embeddings [L, B, Q, C] (a fused backend writes [L, B, Q, h, w] in one pass).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskClassificationHead(nn.Module):
    """Args:
        hidden_dim: width of the decoder outputs.
        num_classes: K; the class head predicts K + 1 logits (the last is "no object").
        mask_dim: channels of the per-pixel embeddings the mask embeddings are dotted with.
        deep_supervision: also predict for the first L - 1 decoder layers ("aux_outputs").
    """

    def __init__(self, hidden_dim: int, num_classes: int, mask_dim: int, deep_supervision: bool = True):
        super().__init__()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.deep_supervision = deep_supervision

    def forward(self, hs: torch.Tensor, mask_features: torch.Tensor, backend: str = "reference",
                aux: bool = True) -> Dict:
        """hs [L, B, Q, hidden_dim], mask_features [B, mask_dim, h, w] -> the MaskFormer outputs dict.
        ``aux=False`` skips the first L - 1 layers even with deep supervision (inference needs only the last)."""
        aux = aux and self.deep_supervision
        if not aux:
            hs = hs[-1:]
        logits = self.class_embed(hs)  # [L, B, Q, K+1]
        mask_embed = self.mask_embed(hs).to(mask_features.dtype)  # [L, B, Q, mask_dim]
        masks = ops.mask_logits(mask_embed, mask_features, backend=backend)  # [L, B, Q, h, w]
        # unbind, not indexing: its backward stacks the L gradients once, where each of L select
        # views would allocate a zero-filled [L, B, Q, h, w] gradient of its own.
        logits, masks = logits.unbind(0), masks.unbind(0)
        out = {"pred_logits": logits[-1], "pred_masks": masks[-1]}
        if aux:
            out["aux_outputs"] = [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])]
        return out
