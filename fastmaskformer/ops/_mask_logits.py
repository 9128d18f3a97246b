"""``mask_logits``: per-query mask logits as dot products of mask and per-pixel embeddings.

logits[l, b, q, y, x] = sum_c mask_embed[l, b, q, c] * pixel_embed[b, c, y, x], for every decoder
layer l at once. ``mask_embed`` may also be [B, Q, C] (one layer), giving [B, Q, h, w].
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, MAX_GRID_YZ, check_same_device, check_tensor
from ._dispatch import Op


def mask_logits_reference(mask_embed: torch.Tensor, pixel_embed: torch.Tensor) -> torch.Tensor:
    if mask_embed.dim() == 3:
        return torch.einsum("bqc,bchw->bqhw", mask_embed, pixel_embed)
    return torch.einsum("lbqc,bchw->lbqhw", mask_embed, pixel_embed)


def _check(mask_embed, pixel_embed, **_):
    check_tensor("mask_embed", mask_embed, None, FLOAT_DTYPES)
    check_tensor("pixel_embed", pixel_embed, 4, FLOAT_DTYPES)
    if mask_embed.dim() not in (3, 4):
        raise ValueError(f"mask_embed: expected [L,B,Q,C] or [B,Q,C], got shape {tuple(mask_embed.shape)}")
    check_same_device(mask_embed=mask_embed, pixel_embed=pixel_embed)
    B, C = pixel_embed.shape[:2]
    if mask_embed.shape[-3] != B or mask_embed.shape[-1] != C:
        raise ValueError(f"mask_embed: expected [..., {B}, Q, {C}] to match pixel_embed {tuple(pixel_embed.shape)}, "
                         f"got {tuple(mask_embed.shape)}")
    if mask_embed.dtype != pixel_embed.dtype:
        raise TypeError(f"mask_embed and pixel_embed: expected one dtype, got {mask_embed.dtype} and {pixel_embed.dtype}")


def _traits(mask_embed, pixel_embed, **_):
    return pixel_embed.shape[0] > MAX_GRID_YZ


# Under autocast the fused kernels get the lower-precision inputs einsum would compute with.
mask_logits = Op("mask_logits", mask_logits_reference, check=_check, traits=_traits, autocast_lower=True)
