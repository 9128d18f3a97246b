"""MaskFormer's transformer decoder: learned queries attend to the stride-32 feature map.

The queries start as zeros; the learned ``query_embed`` is their positional encoding, added in every
attention. The memory is the input map projected to ``hidden_dim`` (1x1 conv, only when the
channels differ) with sine positions, optionally refined by DETR encoder layers first.
"""
from __future__ import annotations

import torch
from torch import nn

from .pixel_decoder import c2_xavier_init_
from .position_encoding import PositionEmbeddingSine
from .transformer import TransformerDecoder, TransformerEncoder, to_sequence


class QueryDecoder(nn.Module):
    """Args:
        in_channels: channels of the input map.
        hidden_dim: transformer width.
        num_queries: number of learned queries.
        nheads, dim_feedforward, dropout: attention heads, FFN width and dropout of every layer.
        dec_layers: decoder layers.
        enc_layers: encoder layers over the input map before decoding (0 in the official recipes).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 6, enc_layers: int = 0, dropout: float = 0.1):
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers: expected >= 1, got {dec_layers}")
        if hidden_dim % nheads:
            raise ValueError(f"hidden_dim: expected a multiple of nheads={nheads}, got {hidden_dim}")
        if in_channels != hidden_dim:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1)
            c2_xavier_init_(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.encoder = TransformerEncoder(hidden_dim, nheads, enc_layers, dim_feedforward, dropout)
        self.decoder = TransformerDecoder(hidden_dim, nheads, dec_layers, dim_feedforward, dropout)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, h, w] -> every decoder layer's (normalized) output [L, B, Q, hidden_dim]."""
        src = self.input_proj(x)
        B = src.shape[0]
        pos = self.pe_layer.as_sequence(src)  # [1, hw, C], shared by the batch
        memory = self.encoder(to_sequence(src), pos)  # [B, hw, C]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # [B, Q, C], a view
        tgt = torch.zeros_like(query_pos, dtype=memory.dtype)
        return self.decoder(tgt, memory, pos, query_pos)
