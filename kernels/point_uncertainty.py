"""Point uncertainty (Mask2Former's importance sampling): -|x| of mask logits read at candidate points.

Fuses, per mask and block of points: the row lookup (row index[n] of the layer's logits, read in
place), grid_sample's bilinear read on 2 coords - 1 (zeros outside, align_corners=False, the
reference's fp32 arithmetic: ms_deform_attn's ``_point``) in the logits' dtype, and -|x|. Never
materialized: the gathered logits, the 2 coords - 1 grid, |x|; the only [N, S] tensor is the output.
A row index out of range gives NaN for that mask, never a read out of bounds.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import plain_op, wrap_triton
from .ms_deform_attn import _point
from .point_mask_loss import _points_per_block, _read, _row


@triton.jit(do_not_specialize=["S", "h", "w", "M"])
def _uncertainty_kernel(logits, coords, index, out, S, h, w, M, blocks, s_n, s_h, s_w, sc_n, sc_p, sc_xy,
                        BP: tl.constexpr, INDEX: tl.constexpr):
    """Program (mask n, block of BP points), on one grid axis: out[n, block] = -|x|."""
    n = (tl.program_id(0) // blocks).to(tl.int64)
    p = tl.program_id(0) % blocks * BP + tl.arange(0, BP)
    row, ok = _row(index, n, M, INDEX)
    valid = p < S
    xy = coords + n * sc_n + p.to(tl.int64) * sc_p
    x0, y0, fx, fy, inside = _point(xy, sc_xy, h, w, valid & ok)
    x = _read(logits + row * s_n, x0, y0, fx, fy, inside, h, w, s_h, s_w)
    tl.store(out + n * S + p, tl.where(ok, -tl.abs(x), float("nan")), mask=valid)


def _point_uncertainty(logits: torch.Tensor, coords: torch.Tensor,
                       index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, S] float32: -|x| of row index[n] (or n) of logits [M, h, w] at coords[n]."""
    N, S = coords.shape[:2]
    M, h, w = logits.shape
    out = torch.empty((N, S), dtype=torch.float32, device=logits.device)
    if N and S:
        BP = _points_per_block(S)
        blocks = triton.cdiv(S, BP)
        # An absent index is never read (its branch is compiled out): coords stands in for the pointer.
        wrap_triton(_uncertainty_kernel)[(N * blocks,)](logits, coords, coords if index is None else index, out, S, h,
                                                        w, M, blocks, *logits.stride(), *coords.stride(), BP=BP,
                                                        INDEX=index is not None, num_warps=4)
    return out


point_uncertainty = plain_op("fastmaskformer::point_uncertainty_triton", _point_uncertainty)
