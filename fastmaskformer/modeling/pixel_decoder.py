"""Pixel decoders: an FPN that turns backbone features into per-pixel embeddings at stride 4.

Both return ``(mask_features [B, mask_dim, H/4, W/4], transformer_input)``: the per-pixel
embeddings that the queries' mask embeddings are dotted with, and the map the transformer decoder
attends to (``transformer_in_channels`` channels at stride 32).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FeatureSpec
from .position_encoding import PositionEmbeddingSine
from .transformer import TransformerEncoder, to_sequence

GN_GROUPS = 32


def c2_xavier_init_(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" used by detectron2 for FPN convs: uniform with gain 1 on fan-in, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def conv_norm(in_ch: int, out_ch: int, kernel_size: int, relu: bool) -> nn.Sequential:
    """Conv (no bias: GroupNorm follows) -> GroupNorm(32) [-> ReLU]."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
    c2_xavier_init_(conv)
    layers = [conv, nn.GroupNorm(GN_GROUPS, out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasePixelDecoder(nn.Module):
    """FPN over res2..res5: each finer level adds its 1x1 lateral projection to the nearest-upsampled
    coarser output, then a 3x3 conv; a final 3x3 conv maps the stride-4 output to ``mask_dim``.

    Args:
        feature_info: name -> FeatureSpec(channels, stride) of the backbone outputs.
        conv_dim: channels of the FPN (a multiple of 32 for GroupNorm(32)).
        mask_dim: channels of the per-pixel embeddings.
    """

    def __init__(self, feature_info: Dict[str, FeatureSpec], conv_dim: int = 256, mask_dim: int = 256):
        super().__init__()
        if conv_dim <= 0 or conv_dim % GN_GROUPS:
            raise ValueError(f"conv_dim: expected a positive multiple of {GN_GROUPS} (GroupNorm groups), "
                             f"got {conv_dim}")
        # Coarse to fine: res5 first.
        self.in_features = sorted(feature_info, key=lambda n: -feature_info[n].stride)
        channels = [feature_info[n].channels for n in self.in_features]
        self.top_conv = self._top_conv(channels[0], conv_dim)
        self.lateral_convs = nn.ModuleList(conv_norm(c, conv_dim, 1, relu=False) for c in channels[1:])
        self.output_convs = nn.ModuleList(conv_norm(conv_dim, conv_dim, 3, relu=True) for _ in channels[1:])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        c2_xavier_init_(self.mask_features)
        self.transformer_in_channels = channels[0]

    def _top_conv(self, in_ch: int, conv_dim: int) -> nn.Module:
        return conv_norm(in_ch, conv_dim, 3, relu=True)

    def encode_top(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The coarsest map -> (its FPN output, the transformer decoder's input)."""
        return self.top_conv(x), x

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        y, transformer_input = self.encode_top(features[self.in_features[0]])
        for name, lateral, output in zip(self.in_features[1:], self.lateral_convs, self.output_convs):
            lat = lateral(features[name])
            y = output(lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
        return self.mask_features(y), transformer_input


class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """The FPN whose coarsest level first goes through a DETR transformer encoder (1x1 projection to
    ``conv_dim``, sine positions); the encoder output feeds both the FPN and the transformer decoder
    (the official COCO panoptic recipe).

    Args (besides BasePixelDecoder's):
        enc_layers, nheads, dim_feedforward, dropout: the encoder's depth, heads, FFN width, dropout.
    """

    def __init__(self, feature_info: Dict[str, FeatureSpec], conv_dim: int = 256, mask_dim: int = 256,
                 enc_layers: int = 6, nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__(feature_info, conv_dim, mask_dim)
        if enc_layers < 1:
            raise ValueError(f"enc_layers: the transformer_encoder pixel decoder needs >= 1 encoder layer "
                             f"(6 in the official recipe), got {enc_layers}")
        self.input_proj = nn.Conv2d(feature_info[self.in_features[0]].channels, conv_dim, 1)
        c2_xavier_init_(self.input_proj)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.encoder = TransformerEncoder(conv_dim, nheads, enc_layers, dim_feedforward, dropout)
        self.transformer_in_channels = conv_dim

    def _top_conv(self, in_ch: int, conv_dim: int) -> nn.Module:
        # The top conv reads the encoder output (conv_dim channels), not the backbone's res5.
        return conv_norm(conv_dim, conv_dim, 3, relu=True)

    def encode_top(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        src = self.input_proj(x)
        B, C, h, w = src.shape
        memory = self.encoder(to_sequence(src), self.pe_layer.as_sequence(src))  # [B, hw, C]
        memory = memory.transpose(1, 2).reshape(B, C, h, w)
        return self.top_conv(memory), memory
