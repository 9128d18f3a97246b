"""Point-sampled mask loss (Mask2Former's criterion): sample + BCE + dice sums, forward and backward.

Fuses, per mask and block of points: grid_sample's bilinear read (zeros outside, align_corners=False,
on 2 coords - 1, the reference's fp32 arithmetic: ms_deform_attn's ``_point``) of the logits [h, w]
in their dtype and of the targets [H, W] in theirs (bool as bytes), each at its own resolution, the
sigmoid, the stable BCE (mask_loss's ``_pixel_terms`` with gamma 0 and no alpha weighting) and the
per-mask sums S[n] = (sum BCE, sum s t, sum s, sum t) over the P points: the statistics contract of
the mask losses, turned into losses by ``ops._mask_loss.losses_from_stats`` with P in place of the
pixel count. Never materialized: any [N, P] tensor (sampled logits, targets, per-point losses or
gradients), forward or backward; the forward writes 4 floats per (mask, block of points), summed
in a fixed order (deterministic).

Mask n may read row pred_index[n] of the logits and row target_index[n] of the targets (the matched
rows of a layer's [B Q, h, w] logits and of the step's targets, read in place). A row index outside
its tensor gives that mask NaN statistics and no gradient, never a read out of bounds (nothing on
the host reads the indices).

Backward, from dL/dS[n] = (gB, gST, gS, -): per point dL/dx = gB (s - t) + (gST t + gS) s (1 - s),
recomputed from the inputs, and added into its 4 bilinear taps of d/d(logits) [N, h, w] (the
adjoint of the read). The adds go through fp32 atomics into an fp32 [N, h, w] buffer, converted to
the logits' dtype afterwards:
- the race-free alternative needs, per logit, the points whose taps touch it: a sort of N P keys
  by tap (10 M at Mask2Former's B=8 shapes) and a segmented reduction, or a pass over all P points
  per tile of logits; both cost more than the scatter, which does 4 adds per point;
- the points of one mask spread over its 128 x 128 logits (half of them drawn uniformly), so few
  adds of a block collide;
- fp32 atomics keep the sum's rounding at fp32 level for fp16/bf16 logits.
The price: the order of the adds, so the gradient's last bits, may change from run to run (as with
grid_sample's own CUDA backward). Under the Triton interpreter atomics run one after the other.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import op_with_autograd, plain_op, wrap_triton
from .mask_loss import _pixel_terms
from .ms_deform_attn import _point


@triton.jit
def _tap(x0, y0, dx: tl.constexpr, dy: tl.constexpr, fx, fy, inside, H, W, s_h, s_w):
    """Corner (x0 + dx, y0 + dy) of the points' taps on an H x W map: element offset (strides
    s_h, s_w), bilinear weight, and whether it lies on the map."""
    cx = x0 + dx
    cy = y0 + dy
    ok = inside & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
    weight = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
    return cy.to(tl.int64) * s_h + cx.to(tl.int64) * s_w, weight, ok


@triton.jit
def _read(base, x0, y0, fx, fy, inside, H, W, s_h, s_w):
    """The bilinear value (fp32, zero off the map) at the points' taps on the map at ``base``."""
    o00, w00, ok00 = _tap(x0, y0, 0, 0, fx, fy, inside, H, W, s_h, s_w)
    o01, w01, ok01 = _tap(x0, y0, 1, 0, fx, fy, inside, H, W, s_h, s_w)
    o10, w10, ok10 = _tap(x0, y0, 0, 1, fx, fy, inside, H, W, s_h, s_w)
    o11, w11, ok11 = _tap(x0, y0, 1, 1, fx, fy, inside, H, W, s_h, s_w)
    v00 = tl.load(base + o00, mask=ok00, other=0).to(tl.float32)
    v01 = tl.load(base + o01, mask=ok01, other=0).to(tl.float32)
    v10 = tl.load(base + o10, mask=ok10, other=0).to(tl.float32)
    v11 = tl.load(base + o11, mask=ok11, other=0).to(tl.float32)
    return w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11


@triton.jit
def _row(index, n, rows, HAS_INDEX: tl.constexpr):
    """The row mask n reads (index[n], or n) and whether it lies in [0, rows); row 0 if not."""
    if HAS_INDEX:
        r = tl.load(index + n).to(tl.int64)
    else:
        r = n
    ok = (r >= 0) & (r < rows)
    return tl.where(ok, r, 0), ok


@triton.jit
def _sample(pred, tgt, coords, n, prow, trow, p, valid, h, w, H, W, sp_n, sp_h, sp_w, st_n, st_h, st_w, sc_n, sc_p,
            sc_xy):
    """Points p [BP] of mask n, which reads rows prow of the logits and trow of the targets: logits x
    and targets t (fp32, zero for invalid lanes) and the logits' taps (x0, y0, fx, fy, inside)."""
    xy = coords + n * sc_n + p.to(tl.int64) * sc_p
    x0, y0, fx, fy, inside = _point(xy, sc_xy, h, w, valid)
    x = _read(pred + prow * sp_n, x0, y0, fx, fy, inside, h, w, sp_h, sp_w)
    tx0, ty0, tfx, tfy, tinside = _point(xy, sc_xy, H, W, valid)
    t = _read(tgt + trow * st_n, tx0, ty0, tfx, tfy, tinside, H, W, st_h, st_w)
    return x, t, x0, y0, fx, fy, inside


@triton.jit(do_not_specialize=["P", "h", "w", "H", "W", "M", "T"])
def _stats_kernel(pred, tgt, coords, pred_index, target_index, partial, P, h, w, H, W, M, T, blocks, sp_n, sp_h,
                  sp_w, st_n, st_h, st_w, sc_n, sc_p, sc_xy, BP: tl.constexpr, PRED_INDEX: tl.constexpr,
                  TARGET_INDEX: tl.constexpr):
    """Program (mask n, block of BP points), on one grid axis: the block's 4 sums into
    partial[n, :, block] ([N, 4, blocks] fp32); NaN when a row index is out of range."""
    n = (tl.program_id(0) // blocks).to(tl.int64)
    block = tl.program_id(0) % blocks
    prow, pok = _row(pred_index, n, M, PRED_INDEX)
    trow, tok = _row(target_index, n, T, TARGET_INDEX)
    p = block * BP + tl.arange(0, BP)
    valid = (p < P) & pok & tok
    x, t, _, _, _, _, _ = _sample(pred, tgt, coords, n, prow, trow, p, valid, h, w, H, W, sp_n, sp_h, sp_w, st_n,
                                  st_h, st_w, sc_n, sc_p, sc_xy)
    s, _, bce, _, _, _, _ = _pixel_terms(x, t, 1.0, 1.0, 0.0, GAMMA_MODE=0)
    out = partial + n * 4 * blocks + block
    bad = tl.where(pok & tok, 0.0, float("nan"))
    tl.store(out, tl.sum(tl.where(valid, bce, 0.0)) + bad)
    tl.store(out + blocks, tl.sum(tl.where(valid, s * t, 0.0)) + bad)
    tl.store(out + 2 * blocks, tl.sum(tl.where(valid, s, 0.0)) + bad)
    tl.store(out + 3 * blocks, tl.sum(t) + bad)  # zero on invalid lanes


@triton.jit
def _scatter(base, x0, y0, dx: tl.constexpr, dy: tl.constexpr, fx, fy, inside, h, w, g):
    """d/d(logits)[corner] += weight * g, atomically in fp32 (points of a block share logits)."""
    offset, weight, ok = _tap(x0, y0, dx, dy, fx, fy, inside, h, w, w, 1)
    tl.atomic_add(base + offset, weight * g, mask=ok, sem="relaxed")


@triton.jit(do_not_specialize=["P", "h", "w", "H", "W", "M", "T"])
def _grad_kernel(pred, tgt, coords, pred_index, target_index, gstats, grad, P, h, w, H, W, M, T, blocks, sp_n, sp_h,
                 sp_w, st_n, st_h, st_w, sc_n, sc_p, sc_xy, BP: tl.constexpr, PRED_INDEX: tl.constexpr,
                 TARGET_INDEX: tl.constexpr):
    """Program (mask n, block of BP points): each point's dL/dx added into its 4 taps of its row of
    grad (contiguous fp32 [M, h, w]); nothing when a row index is out of range."""
    n = (tl.program_id(0) // blocks).to(tl.int64)
    prow, pok = _row(pred_index, n, M, PRED_INDEX)
    trow, tok = _row(target_index, n, T, TARGET_INDEX)
    p = tl.program_id(0) % blocks * BP + tl.arange(0, BP)
    valid = (p < P) & pok & tok
    x, t, x0, y0, fx, fy, inside = _sample(pred, tgt, coords, n, prow, trow, p, valid, h, w, H, W, sp_n, sp_h,
                                           sp_w, st_n, st_h, st_w, sc_n, sc_p, sc_xy)
    s, r, _, _, _, _, _ = _pixel_terms(x, t, 1.0, 1.0, 0.0, GAMMA_MODE=0)
    g_bce = tl.load(gstats + n * 4)
    g_st = tl.load(gstats + n * 4 + 1)
    g_s = tl.load(gstats + n * 4 + 2)
    g = tl.where(valid, g_bce * (s - t) + (g_st * t + g_s) * (s * r), 0.0)
    base = grad + prow * h * w
    _scatter(base, x0, y0, 0, 0, fx, fy, inside, h, w, g)
    _scatter(base, x0, y0, 1, 0, fx, fy, inside, h, w, g)
    _scatter(base, x0, y0, 0, 1, fx, fy, inside, h, w, g)
    _scatter(base, x0, y0, 1, 1, fx, fy, inside, h, w, g)


def _launch(kernel, pred: torch.Tensor, target: torch.Tensor, coords: torch.Tensor, pred_index: Optional[torch.Tensor],
            target_index: Optional[torch.Tensor], *outputs) -> None:
    """One program per (mask, block of points), on one grid axis (no 65535 limit on masks)."""
    M, h, w = pred.shape
    T, H, W = target.shape
    N, P = coords.shape[:2]
    BP = _points_per_block(P)
    blocks = triton.cdiv(P, BP)
    tgt = target.view(torch.uint8) if target.dtype == torch.bool else target  # read as bytes, no copy
    # An absent index is never read (its branch is compiled out): coords stands in for the pointer.
    wrap_triton(kernel)[(N * blocks,)](pred, tgt, coords, coords if pred_index is None else pred_index,
                                       coords if target_index is None else target_index, *outputs, P, h, w, H, W, M,
                                       T, blocks, *pred.stride(), *tgt.stride(), *coords.stride(), BP=BP,
                                       PRED_INDEX=pred_index is not None, TARGET_INDEX=target_index is not None,
                                       num_warps=4)


def _points_per_block(P: int) -> int:
    """1024 points per program (4 warps, 8 points a thread) unless P is smaller; not timed on a GPU yet."""
    return max(16, min(1024, triton.next_power_of_2(P)))


def _stats(pred: torch.Tensor, target: torch.Tensor, coords: torch.Tensor, pred_index: Optional[torch.Tensor] = None,
           target_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, 4] float32: per mask, sums over the P points of (BCE, s t, s, t)."""
    N, P = coords.shape[:2]
    partial = torch.empty((N, 4, triton.cdiv(P, _points_per_block(P))), dtype=torch.float32, device=pred.device)  # 4 floats per block
    if N and P:
        _launch(_stats_kernel, pred, target, coords, pred_index, target_index, partial)
    return partial.sum(-1)


def _stats_backward(grad_stats: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, coords: torch.Tensor,
                    pred_index: Optional[torch.Tensor] = None,
                    target_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d/d(pred) [M, h, w] in pred's dtype, from d/d(stats) [N, 4]."""
    grad = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)  # atomics target
    if coords.shape[0] and coords.shape[1]:
        _launch(_grad_kernel, pred, target, coords, pred_index, target_index, grad_stats.float().contiguous(), grad)
    return grad.to(pred.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the optional row indices may be None


def _backward(ctx, grad_stats):
    # Targets are data and the points are drawn without a gradient: only the logits get one.
    pred, target, coords, pred_index, target_index = ctx.saved_tensors
    return stats_backward(grad_stats, pred, target, coords, pred_index, target_index), None, None, None, None


stats_backward = plain_op("fastmaskformer::point_mask_loss_stats_backward", _stats_backward)
stats = op_with_autograd("fastmaskformer::point_mask_loss_stats", _stats, _backward, _setup_context)
