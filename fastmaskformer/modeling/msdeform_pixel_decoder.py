"""Mask2Former's pixel decoder: multi-scale deformable attention (Deformable DETR) over res3..res5,
then one FPN level for res2.

Every query of the flattened res5, res4, res3 maps (coarsest first) attends to ``n_points`` learned
positions around its own location on each of the three levels, through ``ops.ms_deform_attn``.
Returns ``(mask_features [B, mask_dim, H/4, W/4], [1/32, 1/16, 1/8 maps of conv_dim channels])``:
the per-pixel embeddings and the maps the masked-attention decoder attends to. It computes in
float32 even under autocast, as the official one does (its sampling offsets are too fine for half
precision).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .backbone import FeatureSpec
from .pixel_decoder import GN_GROUPS, c2_xavier_init_, conv_norm
from .position_encoding import PositionEmbeddingSine
from .transformer import FeedForward, _clones, to_sequence, xavier_init_

Shapes = Tuple[Tuple[int, int], ...]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: per head, level and point, a learned offset from the
    query's reference point (in units of the level's size) and a weight (softmax over levels x points).

    Args:
        d_model: channels of queries and values (split over ``n_heads``).
        n_levels, n_heads, n_points: levels attended, heads, sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialization: zero offset weights and a bias putting head m's k-th point at
        k times the unit step in direction 2*pi*m/heads (scaled so the larger coordinate is k), on
        every level; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack((theta.cos(), theta.sin()), -1)  # (x, y) per head
        direction = direction / direction.abs().max(-1, keepdim=True).values
        step = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = direction[:, None, None, :] * step[None, None, :, None]  # [heads, 1, points, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor, shapes: Shapes,
                level_start_index: torch.Tensor, offset_normalizer: torch.Tensor,
                backend: str = "reference") -> torch.Tensor:
        """query [B, Lq, C]; reference_points [1 or B, Lq, 1 or L, 2] (x, y) in [0, 1]; value [B, S, C]
        (the flattened levels); shapes ((h, w) per level); offset_normalizer float [L, 2] = (w, h) per
        level -> [B, Lq, C]."""
        B, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).unflatten(-1, (M, -1))  # [B, S, heads, dh]
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        locations = reference_points[:, :, None, :, None, :] + offsets / offset_normalizer[:, None, :]
        out = ops.ms_deform_attn(v, shapes, level_start_index, locations, weights, backend=backend)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention (positions added to the queries only), then the FFN."""

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor, shapes: Shapes,
                level_start_index: torch.Tensor, offset_normalizer: torch.Tensor, backend: str) -> torch.Tensor:
        attn = self.self_attn(src + pos, reference_points, src, shapes, level_start_index, offset_normalizer, backend)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self.ffn(src)))


def reference_points(shapes: Shapes, device: torch.device) -> torch.Tensor:
    """Pixel centres of every level, (x, y) normalized by the level's (valid = whole) size:
    [1, S, 1, 2], the same for every image and, broadcast, for every level attended."""
    points = []
    for h, w in shapes:
        y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        points.append(torch.stack((x[None, :].expand(h, w), y[:, None].expand(h, w)), -1).reshape(h * w, 2))
    return torch.cat(points)[None, :, None, :]


class MSDeformAttnPixelDecoder(nn.Module):
    """Args:
        feature_info: name -> FeatureSpec(channels, stride) of the backbone outputs (res2..res5).
        conv_dim: channels of the encoder and the FPN (a multiple of 32 for GroupNorm(32)).
        mask_dim: channels of the per-pixel embeddings.
        enc_layers, nheads, n_points, dim_feedforward, dropout: the deformable encoder's depth, heads,
            points per head and level, FFN width and dropout.
        transformer_in_features: the backbone maps the encoder reads; the finer ones get FPN levels.
        num_decoder_levels: how many of the output maps (coarsest first) the transformer decoder gets.
    """

    def __init__(self, feature_info: Dict[str, FeatureSpec], conv_dim: int = 256, mask_dim: int = 256,
                 enc_layers: int = 6, nheads: int = 8, n_points: int = 4, dim_feedforward: int = 1024,
                 dropout: float = 0.0, transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
                 num_decoder_levels: int = 3):
        super().__init__()
        if conv_dim <= 0 or conv_dim % GN_GROUPS:
            raise ValueError(f"conv_dim: expected a positive multiple of {GN_GROUPS} (GroupNorm groups), "
                             f"got {conv_dim}")
        if enc_layers < 1:
            raise ValueError(f"enc_layers: expected >= 1 deformable encoder layers (6 in the official recipe), "
                             f"got {enc_layers}")
        unknown = [n for n in transformer_in_features if n not in feature_info]
        if unknown or not transformer_in_features:
            raise ValueError(f"transformer_in_features: expected names among {sorted(feature_info)}, "
                             f"got {list(transformer_in_features)}")
        # Coarse to fine: res5 first, as the official decoder orders its levels.
        self.encoder_features = sorted(transformer_in_features, key=lambda n: -feature_info[n].stride)
        finest = feature_info[self.encoder_features[-1]].stride
        self.fpn_features = sorted((n for n, s in feature_info.items() if s.stride < finest), key=lambda n: -feature_info[n].stride)
        levels = len(self.encoder_features)
        if not 1 <= num_decoder_levels <= levels + len(self.fpn_features):
            raise ValueError(f"num_decoder_levels: expected 1..{levels + len(self.fpn_features)}, got {num_decoder_levels}")
        self.num_decoder_levels = num_decoder_levels

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(feature_info[n].channels, conv_dim, 1), nn.GroupNorm(GN_GROUPS, conv_dim))
            for n in self.encoder_features)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(levels, conv_dim))
        self.encoder = _clones(DeformableEncoderLayer(conv_dim, levels, nheads, n_points, dim_feedforward, dropout),
                               enc_layers)
        xavier_init_(self.encoder)
        for layer in self.encoder:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        self.lateral_convs = nn.ModuleList(conv_norm(feature_info[n].channels, conv_dim, 1, relu=False)
                                           for n in self.fpn_features)
        self.output_convs = nn.ModuleList(conv_norm(conv_dim, conv_dim, 3, relu=True) for _ in self.fpn_features)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        c2_xavier_init_(self.mask_features)

    def forward(self, features: Dict[str, torch.Tensor], backend: str = "reference"
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        device = features[self.encoder_features[0]].device
        with torch.autocast(device.type, enabled=False):
            return self._forward_fp32(features, backend)

    def _forward_fp32(self, features: Dict[str, torch.Tensor], backend: str) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        srcs = [proj(features[n].float()) for proj, n in zip(self.input_proj, self.encoder_features)]
        # The level sizes as Python ints once per forward: no layer ever reads them back from a device.
        shapes: Shapes = tuple((int(s.shape[-2]), int(s.shape[-1])) for s in srcs)
        sizes = [h * w for h, w in shapes]
        device = srcs[0].device
        starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64, device=device)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device)
        src = torch.cat([to_sequence(s) for s in srcs], 1)  # [B, S, C]
        pos = torch.cat([self.pe_layer.as_sequence(s) + e for s, e in zip(srcs, self.level_embed)], 1)  # [1, S, C]
        ref = reference_points(shapes, device)
        for layer in self.encoder:
            src = layer(src, pos, ref, shapes, starts, normalizer, backend)
        B, _, C = src.shape
        outs = [x.transpose(1, 2).reshape(B, C, h, w) for x, (h, w) in zip(src.split(sizes, 1), shapes)]
        for name, lateral, output in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            lat = lateral(features[name].float())
            outs.append(output(lat + F.interpolate(outs[-1], size=lat.shape[-2:], mode="bilinear",
                                                   align_corners=False)))
        return self.mask_features(outs[-1]), outs[:self.num_decoder_levels]
