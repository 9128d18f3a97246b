"""Mask2Former's transformer decoder: masked attention over multi-scale features, round-robin.

Learned queries (``query_feat``) with learned positions (``query_embed``) go through ``dec_layers``
post-norm layers; layer i attends to level i % 3 of the pixel decoder's maps, coarsest first. Each
layer runs masked cross-attention, then self-attention, then the FFN. Query q of image b may only
attend to the pixels where its previous mask prediction has sigmoid >= 0.5 (a query whose mask is
empty at that level attends everywhere); the mask is never differentiated through.

The decoder returns the shared-LayerNorm'ed queries before the first layer and after every layer,
[dec_layers + 1, B, Q, C]; the prediction head turns all of them into class and mask logits at once.
For the attention masks it needs the previous layer's mask logits at the attended level's size:
bilinear resizing is linear and acts per channel, so resizing the mask *features* to the three level
sizes once and dotting them with the mask embeddings gives exactly the resized logits, without
computing the 1/4-resolution logits inside the loop.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .pixel_decoder import c2_xavier_init_
from .position_encoding import PositionEmbeddingSine
from .transformer import FeedForward, to_sequence, xavier_init_


def attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``attn``'s computation (its weights, batch-first [B, n, C] inputs) through
    ``F.scaled_dot_product_attention``, with a bool ``mask`` [B, 1, Q, S] (True = may attend) that
    broadcasts over the heads: it is never repeated per head, as nn.MultiheadAttention would need."""
    heads = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, heads, Q, dh]
    k = F.linear(key, w_k, b_k).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, heads, S, dh]
    v = F.linear(value, w_v, b_v).unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention (positions added to queries and keys), self-attention, FFN; post-norm."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        xavier_init_(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tgt [B, Q, C], memory [B, S, C], pos [1, S, C], query_pos [1, Q, C], mask bool [B, 1, Q, S]."""
        attn = attention(self.cross_attn, tgt + query_pos, memory + pos, memory, mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(attention(self.self_attn, q, q, tgt)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


@torch.no_grad()
def attention_mask(mask_embed: torch.Tensor, level_features: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """mask_embed [B, Q, C], level_features [B, C, h, w] (the mask features resized to the level) ->
    bool [B, 1, Q, h*w], True where sigmoid(mask logit) >= 0.5; a row with no such pixel is all True.
    Computed without autograd: the attention mask is a constant of the graph (detached)."""
    logits = ops.mask_logits(mask_embed.to(level_features.dtype), level_features, backend=backend)
    allowed = logits.flatten(2).sigmoid() >= 0.5  # the official rule: sigmoid < 0.5 is blocked
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


class MaskedAttentionDecoder(nn.Module):
    """Args:
        in_channels: channels of the pixel decoder's maps (a 1x1 projection when not hidden_dim).
        hidden_dim: transformer width.
        num_queries: number of learned queries.
        nheads, dim_feedforward, dropout: attention heads, FFN width and dropout of every layer.
        dec_layers: decoder layers (9 in the official recipes; 10 predictions with the initial one).
        num_levels: feature levels attended round-robin (3).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 9, dropout: float = 0.0, num_levels: int = 3):
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers: expected >= 1, got {dec_layers}")
        if hidden_dim % nheads:
            raise ValueError(f"hidden_dim: expected a multiple of nheads={nheads}, got {hidden_dim}")
        self.num_levels = num_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.input_proj = nn.ModuleList(_projection(in_channels, hidden_dim) for _ in range(num_levels))
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(MaskedAttentionLayer(hidden_dim, nheads, dim_feedforward, dropout)
                                    for _ in range(dec_layers))
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, features: Sequence[torch.Tensor], mask_features: torch.Tensor, mask_embed: nn.Module,
                backend: str = "reference") -> torch.Tensor:
        """features: ``num_levels`` maps [B, in_channels, h_l, w_l], coarsest first; mask_features
        [B, mask_dim, H/4, W/4]; mask_embed: the head's mask MLP (for the attention masks) ->
        the normalized queries of every prediction [dec_layers + 1, B, Q, hidden_dim]."""
        if len(features) != self.num_levels:
            raise ValueError(f"features: expected {self.num_levels} maps (coarsest first), got {len(features)}")
        memories: List[torch.Tensor] = []
        positions: List[torch.Tensor] = []
        for proj, x, level in zip(self.input_proj, features, self.level_embed.weight):
            src = proj(x)
            memories.append(to_sequence(src) + level)  # [B, h*w, C]
            positions.append(self.pe_layer.as_sequence(src))  # [1, h*w, C]
        with torch.no_grad():
            level_features = [F.interpolate(mask_features, size=x.shape[-2:], mode="bilinear", align_corners=False)
                              for x in features]
        B = mask_features.shape[0]
        query_pos = self.query_embed.weight[None]  # [1, Q, C]
        tgt = self.query_feat.weight[None].expand(B, -1, -1)  # [B, Q, C], a view
        outputs = [self.norm(tgt)]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            with torch.no_grad():
                mask = attention_mask(mask_embed(outputs[-1]), level_features[level], backend)
            tgt = layer(tgt, memories[level], positions[level], query_pos, mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


def _projection(in_channels: int, hidden_dim: int) -> nn.Module:
    if in_channels == hidden_dim:
        return nn.Identity()
    conv = nn.Conv2d(in_channels, hidden_dim, 1)
    c2_xavier_init_(conv)
    return conv
