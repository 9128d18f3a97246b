"""Multi-scale deformable attention (Deformable DETR's MSDeformAttn core), forward and backward.

Fuses, per query block and head: for every level and point, grid_sample's bilinear read (zeros
outside, align_corners=False, on the grid 2 loc - 1) of the value rows around the location, the
attention weighting and the sum over levels and points. Never materialized: the reference's
per-level [B*heads, dh, Lq, P] samples, their stack and the weighted product; a program holds a
[BQ, dh] accumulator. fp32/fp16/bf16 inputs are read in their dtype and the math is fp32.

Backward, in one pass over the same points: the gradient of each sample is the output gradient
row g[q, h, :]; per corner k of a point, with d_k = <g, value row k>,
    d/d attention_weight = sum_k w_k d_k,
    d/d loc_x = a W ((1 - fy)(d_01 - d_00) + fy (d_11 - d_10)),   (d/d loc_y alike with H),
    d/d value row k += a w_k g.
The location and weight gradients belong to one point and are stored once. The value gradient is a
scatter to data-dependent rows, and it is done with fp32 atomic adds into an fp32 [B, S, heads, dh]
buffer (converted to value's dtype afterwards), as the official CUDA kernel does:
- the race-free alternative, gathering per value row the (query, point, corner) triples that touch
  it, needs their inverse map: a sort of 4 B Lq heads L P keys per call (4.1 M at the R50 encoder
  shapes, ~70 MB of keys and indices) and a segmented reduction, more traffic than the scatter;
- locations spread over the map (each query near its own reference point), so few adds collide;
- fp32 atomics keep the sum's rounding at fp32 level for fp16/bf16 values (half atomics would not).
The price: the order of the adds, so the value gradient's last bits, may change from run to run
(as with grid_sample's own CUDA backward). The Triton interpreter applies atomics one after the
other, so the tests cannot see a race; the design has none to see, since every add is atomic.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import op_with_autograd, plain_op, wrap_triton


@triton.jit
def _point(loc_ptr, s_xy, H, W, qmask):
    """grid_sample's pixel position of locations (x, y) = (loc_ptr[0], loc_ptr[s_xy]) on an H x W
    level, in the reference's fp32 order: top-left corner (x0, y0) int32, offsets (fx, fy), and
    ``inside`` (a corner may lie on the level; False for NaN and far-away points)."""
    lx = tl.load(loc_ptr, mask=qmask, other=0.0).to(tl.float32)
    ly = tl.load(loc_ptr + s_xy, mask=qmask, other=0.0).to(tl.float32)
    Wf = W.to(tl.float32)
    Hf = H.to(tl.float32)
    x = (2.0 * lx - 1.0 + 1.0) * (Wf * 0.5) - 0.5
    y = (2.0 * ly - 1.0 + 1.0) * (Hf * 0.5) - 0.5
    inside = qmask & (x > -2.0) & (y > -2.0) & (x < Wf + 1.0) & (y < Hf + 1.0)
    x = tl.where(inside, x, -2.0)
    y = tl.where(inside, y, -2.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x0.to(tl.int32), y0.to(tl.int32), x - x0, y - y0, inside


@triton.jit
def _corner(rows, s_row, cx, cy, H, W, inside, ch, cmask):
    """Value rows at corners (cx, cy) [BQ] of the level starting at ``rows``, as fp32 [BQ, BC]
    (zero off the level), with their validity and row index within the level."""
    valid = inside & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
    r = cy.to(tl.int64) * W + cx
    v = tl.load(rows + r[:, None] * s_row + ch[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
    return v.to(tl.float32), valid, r


@triton.jit
def _forward_kernel(value, shapes, starts, loc, attn, out, Lq, heads, L, P, DH,
                    sv_b, sv_s, sv_h, sv_c, sl_b, sl_q, sl_h, sl_l, sl_p, sl_xy, sa_b, sa_q, sa_h, sa_l, sa_p,
                    BQ: tl.constexpr, BC: tl.constexpr):
    """Program (image * head, query block) on one grid axis (so B * heads has no 65535 limit):
    out[b, q, h*DH:(h+1)*DH] for BQ queries."""
    blocks = tl.cdiv(Lq, BQ)
    bh = tl.program_id(0) // blocks
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    q = tl.program_id(0) % blocks * BQ + tl.arange(0, BQ)
    qmask = q < Lq
    c = tl.arange(0, BC)
    cmask = c < DH
    ch = c * sv_c
    loc_q = loc + b * sl_b + q.to(tl.int64) * sl_q + h * sl_h
    attn_q = attn + b * sa_b + q.to(tl.int64) * sa_q + h * sa_h
    acc = tl.zeros((BQ, BC), tl.float32)
    for l in range(L):
        H = tl.load(shapes + 2 * l)
        W = tl.load(shapes + 2 * l + 1)
        rows = value + b * sv_b + tl.load(starts + l) * sv_s + h * sv_h
        for p in range(P):
            x0, y0, fx, fy, inside = _point(loc_q + l * sl_l + p * sl_p, sl_xy, H, W, qmask)
            a = tl.load(attn_q + l * sa_l + p * sa_p, mask=qmask, other=0.0).to(tl.float32)
            v00, _, _ = _corner(rows, sv_s, x0, y0, H, W, inside, ch, cmask)
            v01, _, _ = _corner(rows, sv_s, x0 + 1, y0, H, W, inside, ch, cmask)
            v10, _, _ = _corner(rows, sv_s, x0, y0 + 1, H, W, inside, ch, cmask)
            v11, _, _ = _corner(rows, sv_s, x0 + 1, y0 + 1, H, W, inside, ch, cmask)
            top = (1.0 - fx)[:, None] * v00 + fx[:, None] * v01
            bottom = (1.0 - fx)[:, None] * v10 + fx[:, None] * v11
            acc += (a * (1.0 - fy))[:, None] * top + (a * fy)[:, None] * bottom
    dst = out + (b * Lq + q.to(tl.int64))[:, None] * (heads * DH) + h * DH + c[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])


@triton.jit
def _scatter(grad_rows, r, s_row, c, valid, cmask, contribution):
    """grad_rows[r, c] += contribution [BQ, BC], atomically in fp32 (rows shared between queries)."""
    tl.atomic_add(grad_rows + r[:, None] * s_row + c[None, :], contribution,
                  mask=valid[:, None] & cmask[None, :], sem="relaxed")


@triton.jit
def _backward_kernel(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, S, Lq, heads, L, P,
                     DH, sg_b, sg_q, sg_c, sv_b, sv_s, sv_h, sv_c, sl_b, sl_q, sl_h, sl_l, sl_p, sl_xy,
                     sa_b, sa_q, sa_h, sa_l, sa_p, BQ: tl.constexpr, BC: tl.constexpr):
    """Program (image * head, query block): the gradients of its points (stored) and their share of
    the value gradient (atomic adds into the fp32 buffer grad_value, contiguous [B, S, heads, DH])."""
    blocks = tl.cdiv(Lq, BQ)
    bh = tl.program_id(0) // blocks
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    q = tl.program_id(0) % blocks * BQ + tl.arange(0, BQ)
    qmask = q < Lq
    c = tl.arange(0, BC)
    cmask = c < DH
    ch = c * sv_c
    q64 = q.to(tl.int64)
    g = tl.load(grad_out + b * sg_b + q64[:, None] * sg_q + (h * DH + c)[None, :] * sg_c,
                mask=qmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [BQ, BC]
    loc_q = loc + b * sl_b + q64 * sl_q + h * sl_h
    attn_q = attn + b * sa_b + q64 * sa_q + h * sa_h
    point_q = ((b * Lq + q64) * heads + h) * L * P  # the points' index in the contiguous gradients
    gv_row = heads * DH
    for l in range(L):
        H = tl.load(shapes + 2 * l)
        W = tl.load(shapes + 2 * l + 1)
        start = tl.load(starts + l)
        rows = value + b * sv_b + start * sv_s + h * sv_h
        grad_rows = grad_value + (b * S + start) * gv_row + h * DH
        for p in range(P):
            x0, y0, fx, fy, inside = _point(loc_q + l * sl_l + p * sl_p, sl_xy, H, W, qmask)
            a = tl.load(attn_q + l * sa_l + p * sa_p, mask=qmask, other=0.0).to(tl.float32)
            v00, ok00, r00 = _corner(rows, sv_s, x0, y0, H, W, inside, ch, cmask)
            v01, ok01, r01 = _corner(rows, sv_s, x0 + 1, y0, H, W, inside, ch, cmask)
            v10, ok10, r10 = _corner(rows, sv_s, x0, y0 + 1, H, W, inside, ch, cmask)
            v11, ok11, r11 = _corner(rows, sv_s, x0 + 1, y0 + 1, H, W, inside, ch, cmask)
            d00 = tl.sum(g * v00, 1)
            d01 = tl.sum(g * v01, 1)
            d10 = tl.sum(g * v10, 1)
            d11 = tl.sum(g * v11, 1)
            w00 = (1.0 - fx) * (1.0 - fy)
            w01 = fx * (1.0 - fy)
            w10 = (1.0 - fx) * fy
            w11 = fx * fy
            _scatter(grad_rows, r00, gv_row, c, ok00, cmask, (a * w00)[:, None] * g)
            _scatter(grad_rows, r01, gv_row, c, ok01, cmask, (a * w01)[:, None] * g)
            _scatter(grad_rows, r10, gv_row, c, ok10, cmask, (a * w10)[:, None] * g)
            _scatter(grad_rows, r11, gv_row, c, ok11, cmask, (a * w11)[:, None] * g)
            gx = a * W.to(tl.float32) * ((1.0 - fy) * (d01 - d00) + fy * (d11 - d10))
            gy = a * H.to(tl.float32) * ((1.0 - fx) * (d10 - d00) + fx * (d11 - d01))
            point = point_q + l * P + p
            tl.store(grad_attn + point, (w00 * d00 + w01 * d01 + w10 * d10 + w11 * d11).to(grad_attn.dtype.element_ty),
                     mask=qmask)
            tl.store(grad_loc + 2 * point, gx.to(grad_loc.dtype.element_ty), mask=qmask)
            tl.store(grad_loc + 2 * point + 1, gy.to(grad_loc.dtype.element_ty), mask=qmask)


# Checked with ptxas for sm_90 (no GPU to time them): tiles of 1024 elements, 4 warps forward and 8
# backward, use <= 188 registers and spill nothing in fp32/fp16/bf16 at dh = 32 and 64; 2048-element
# tiles spill (four corners' [BQ, BC] 64-bit addresses live at once). Not timed or tuned yet.
_WARPS_FORWARD, _WARPS_BACKWARD = 4, 8


def _blocks(dh: int) -> Tuple[int, int]:
    """(BQ, BC): all dh channels of a head (padded to a power of two) for a block of queries."""
    bc = triton.next_power_of_2(max(dh, 1))
    return max(1, min(64, 1024 // bc)), bc


def _forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """[B, Lq, heads * dh] in value's dtype."""
    B, S, heads, dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_empty((B, Lq, heads * dh))
    if out.numel() == 0:
        return out
    BQ, BC = _blocks(dh)
    wrap_triton(_forward_kernel)[(triton.cdiv(Lq, BQ) * B * heads,)](
        value, spatial_shapes.contiguous(), level_start_index.contiguous(), sampling_locations, attention_weights, out,
        Lq, heads, L, P, dh, *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), BQ=BQ, BC=BC,
        num_warps=_WARPS_FORWARD)
    return out


def _backward(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
              level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
              attention_weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d value, d sampling_locations, d attention_weights), each in its input's dtype."""
    B, S, heads, dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)  # atomics target
    grad_loc = torch.zeros(sampling_locations.shape, dtype=sampling_locations.dtype, device=value.device)
    grad_attn = torch.zeros(attention_weights.shape, dtype=attention_weights.dtype, device=value.device)
    if grad_attn.numel() and dh:
        BQ, BC = _blocks(dh)
        wrap_triton(_backward_kernel)[(triton.cdiv(Lq, BQ) * B * heads,)](
            grad_output, value, spatial_shapes.contiguous(), level_start_index.contiguous(), sampling_locations,
            attention_weights, grad_value, grad_loc, grad_attn, S, Lq, heads, L, P, dh, *grad_output.stride(),
            *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), BQ=BQ, BC=BC,
            num_warps=_WARPS_BACKWARD)
    return grad_value.to(value.dtype), grad_loc, grad_attn


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, grad_output):
    value, shapes, starts, locations, weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = backward(grad_output, value, shapes, starts, locations, weights)
    return grad_value, None, None, grad_loc, grad_attn


backward = plain_op("fastmaskformer::ms_deform_attn_triton_backward", _backward)
ms_deform_attn = op_with_autograd("fastmaskformer::ms_deform_attn_triton", _forward, _grads, _setup_context)
