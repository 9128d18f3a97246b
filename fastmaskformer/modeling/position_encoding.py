"""DETR's sine positional encoding of a feature map (the one MaskFormer uses, without padding masks).

For a map of size h x w, row y in 1..h and column x in 1..w are normalized to (0, 2*pi]; channel
pair (2i, 2i+1) of the first ``num_pos_feats`` channels holds (sin, cos)(y / T^(2i/F)), the next
``num_pos_feats`` the same for x.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Args:
        num_pos_feats: channels per axis; the encoding has ``2 * num_pos_feats`` channels.
        temperature: T, the base of the frequency ladder.
        normalize: scale coordinates to (0, ``scale``] so the encoding does not depend on map size.
        scale: the normalized coordinate range (2*pi by default).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats: expected an even number (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w] (only its size and device are used) -> [1, 2 * num_pos_feats, h, w] float32,
        the same for every image, so it broadcasts over the batch."""
        h, w = x.shape[-2:]
        y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (h + eps) * self.scale
            x_embed = x_embed / (w + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = _interleave_sin_cos(y_embed[:, None] / dim_t)  # [h, F]
        pos_x = _interleave_sin_cos(x_embed[:, None] / dim_t)  # [w, F]
        pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0)

    def as_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The encoding of x's positions as a [1, h*w, 2 * num_pos_feats] sequence in x's dtype."""
        return self(x).to(x.dtype).flatten(2).transpose(1, 2)


def _interleave_sin_cos(t: torch.Tensor) -> torch.Tensor:
    """[n, F] -> [n, F] with sin of the even columns and cos of the odd ones, pairwise interleaved."""
    return torch.stack((t[:, 0::2].sin(), t[:, 1::2].cos()), dim=-1).flatten(1)
