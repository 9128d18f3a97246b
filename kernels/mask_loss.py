"""Fused focal + dice mask loss: bilinear upsampling, sigmoid, focal and dice terms in one pass.

Fuses: F.interpolate(bilinear, align_corners=False) of the [N, h, w] logits to the targets' [H, W],
the sigmoid, the sigmoid focal loss and the three dice sums, reduced per mask; and, in backward,
the per-pixel gradient and the adjoint of the upsampling, written straight to d/d(pred [N, h, w]).
Never materialized: any N x H x W float tensor (upsampled logits, probabilities, per-pixel losses,
per-pixel gradients), forward or backward. Targets are read in their own dtype (bool as bytes)
and converted to fp32 in registers, so soft float targets give the reference's loss.

The op ``sums`` computes per-mask sums S[n] = (sum focal, sum p*t, sum p, sum t) over the H x W
pixels (the statistics contract of every mask-loss backend); the losses are tiny torch expressions of S, so autograd hands backward dL/dS[n] and the kernel
needs no knowledge of how the sums were combined:
    dL/dx_pixel = gF * dfocal/dx + (gPT * t + gP) * p (1 - p),   (gF, gPT, gP) = dL/dS[n, :3],
    dL/dpred = Wy^T (dL/dx) Wx   with Wy [H, h], Wx [W, w] the bilinear interpolation matrices.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bilinear_sample, configs, dot_precision, fit_configs, linear_taps, op_with_autograd, plain_op, \
    scale, wrap_triton


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1], accurate for tiny e (Goldberg's trick; tl has no log1p)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _pixel_terms(x, t, a_pos, a_neg, gamma, GAMMA_MODE: tl.constexpr):
    """Per pixel, stable for any |x|: p = sigmoid(x), r = 1 - p (no cancellation), q = 1 - p_t, the
    focal modulator q^gamma and its derivative d(q^gamma)/dx. GAMMA_MODE: 0 gamma == 0, 2 gamma ==
    2, 1 other.

    d(q^gamma)/dx = gamma q^gamma (1 - 2t) p r / q. Written as gamma q^(gamma-1) dq/dx it overflows
    for gamma < 1 at saturated logits (q^(gamma-1) -> inf while dq/dx -> 0, and inf * 0 = NaN);
    here p r / q = max(p, r) * (min(p, r) / q) <= 1 because q >= min(p, r), so nothing overflows
    and the limit at q == 0 is 0."""
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    r = tl.where(x >= 0, e * inv, inv)
    bce = tl.maximum(x, 0.0) - x * t + _log1p(e)
    q = p * (1.0 - t) + r * t  # 1 - p_t
    alpha_t = a_pos * t + a_neg * (1.0 - t)
    dq = (1.0 - 2.0 * t) * p * r  # d(1 - p_t)/dx
    if GAMMA_MODE == 0:
        mod = tl.full(q.shape, 1.0, tl.float32)
        dmod = tl.zeros(q.shape, tl.float32)
    elif GAMMA_MODE == 2:
        mod = q * q
        dmod = 2.0 * q * dq
    else:  # q^gamma with its limit 0 at q == 0
        mod = tl.where(q > 0, tl.exp2(gamma * tl.log2(tl.where(q > 0, q, 1.0))), 0.0)
        ratio = tl.maximum(p, r) * tl.where(q > 0, tl.minimum(p, r) / tl.where(q > 0, q, 1.0), 0.0)  # p r / q
        dmod = gamma * mod * (1.0 - 2.0 * t) * ratio
    return p, r, bce, q, alpha_t, mod, dmod


@triton.jit
def _load_tile(pred, tgt, n, Y, X, h, w, H, W, scale_h, scale_w, sp_n, sp_h, sp_w, st_n, st_h, st_w):
    """Upsampled logits and targets (fp32) of the pixel tile rows Y [BY, 1] x cols X [1, BX]."""
    valid = (Y < H) & (X < W)
    iy0, iy1, wy0, wy1 = linear_taps(Y, scale_h, h)
    ix0, ix1, wx0, wx1 = linear_taps(X, scale_w, w)
    x = bilinear_sample(pred + n.to(tl.int64) * sp_n, iy0.to(tl.int64) * sp_h, iy1.to(tl.int64) * sp_h, wy0, wy1,
                        ix0.to(tl.int64) * sp_w, ix1.to(tl.int64) * sp_w, wx0, wx1, valid)
    t = tl.load(tgt + n.to(tl.int64) * st_n + Y.to(tl.int64) * st_h + X.to(tl.int64) * st_w, mask=valid,
                other=0).to(tl.float32)
    return x, t, valid


_FWD_GPU = [triton.Config({"BY": by, "BX": bx}, num_warps=nw)
            for by, bx, nw in ((4, 128, 4), (8, 128, 4), (8, 256, 8), (16, 128, 8), (16, 64, 4))]


@triton.autotune(configs=configs(_FWD_GPU, triton.Config({"BY": 16, "BX": 64})), key=["h", "w", "H", "W"],
                 prune_configs_by={"early_config_prune": fit_configs({"BY": "H", "BX": "W"})})
@triton.jit
def _sums_kernel(pred, tgt, rowsums, h, w, H, W, scale_h, scale_w, a_pos, a_neg, gamma, sp_n, sp_h, sp_w,
                 st_n, st_h, st_w, GAMMA_MODE: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Program (n, rows [BY]): per-row sums over all W columns, written to rowsums [N, 4, H]. Per-row
    partials (not per-program) keep the layout independent of the config and the result deterministic."""
    n = tl.program_id(0)
    Y = tl.program_id(1) * BY + tl.arange(0, BY)[:, None]
    acc_f = tl.zeros((BY, BX), tl.float32)
    acc_pt = tl.zeros((BY, BX), tl.float32)
    acc_p = tl.zeros((BY, BX), tl.float32)
    acc_t = tl.zeros((BY, BX), tl.float32)
    for x0 in range(0, W, BX):
        X = x0 + tl.arange(0, BX)[None, :]
        x, t, valid = _load_tile(pred, tgt, n, Y, X, h, w, H, W, scale_h, scale_w, sp_n, sp_h, sp_w, st_n, st_h, st_w)
        p, r, bce, q, alpha_t, mod, dmod = _pixel_terms(x, t, a_pos, a_neg, gamma, GAMMA_MODE)
        acc_f += tl.where(valid, alpha_t * mod * bce, 0.0)
        acc_pt += tl.where(valid, p * t, 0.0)
        acc_p += tl.where(valid, p, 0.0)
        acc_t += t  # zero where masked
    rows = tl.program_id(1) * BY + tl.arange(0, BY)
    out = rowsums + n.to(tl.int64) * 4 * H + rows
    tl.store(out, tl.sum(acc_f, 1), mask=rows < H)
    tl.store(out + H, tl.sum(acc_pt, 1), mask=rows < H)
    tl.store(out + 2 * H, tl.sum(acc_p, 1), mask=rows < H)
    tl.store(out + 3 * H, tl.sum(acc_t, 1), mask=rows < H)


@triton.jit
def _tap_matrix(i, i0, i1, w0, w1):
    """Interpolation weights between low-res indices ``i`` and pixels with taps (i0, i1, w0, w1), on
    crossed axes (one operand a column, the other a row); both taps add where they coincide (edge)."""
    return tl.where(i0 == i, w0, 0.0) + tl.where(i1 == i, w1, 0.0)


@triton.jit
def _pixel_range(lo, hi, inv_scale, n_out):
    """Output pixels [start, stop) whose bilinear taps can touch low-res indices [lo, hi): the index
    rule inverted analytically, one pixel of slack each side (checked exhaustively for sizes < 260)."""
    start = tl.maximum(tl.floor((lo.to(tl.float32) - 0.5) * inv_scale - 0.5).to(tl.int32) - 1, 0)
    stop = tl.minimum(tl.ceil((hi.to(tl.float32) + 0.5) * inv_scale - 0.5).to(tl.int32) + 1, n_out)
    return start, stop


# Checked with ptxas for sm_90 (no GPU to time them): <= 255 registers, at most 16 bytes spilled;
# software pipelining (num_stages > 1) spills, so it is off.
_BWD_GPU = [triton.Config({"BI": bi, "BJ": bj, "BY": by, "BX": bx}, num_warps=nw, num_stages=1)
            for bi, bj, by, bx, nw in ((16, 16, 16, 64, 4), (32, 32, 16, 32, 4), (16, 64, 16, 64, 4),
                                       (32, 64, 32, 64, 8), (64, 64, 32, 64, 8), (32, 32, 32, 32, 8))]


@triton.autotune(configs=configs(_BWD_GPU, triton.Config({"BI": 16, "BJ": 16, "BY": 64, "BX": 64})),
                 key=["h", "w", "H", "W"],
                 prune_configs_by={"early_config_prune": fit_configs({"BI": "h", "BJ": "w", "BY": "H", "BX": "W"})})
@triton.jit
def _grad_kernel(pred, tgt, gsums, grad, inv_scale_h, inv_scale_w, h, w, H, W, scale_h, scale_w, a_pos, a_neg, gamma,
                 sp_n, sp_h, sp_w, st_n, st_h, st_w, GAMMA_MODE: tl.constexpr, PRECISION: tl.constexpr,
                 BI: tl.constexpr, BJ: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Program (n, low-res tile [BI, BJ]): gathers, over the pixels whose taps reach the tile, the
    per-pixel gradient weighted by the interpolation matrices: grad = sum Wy^T [BI,BY] (g [BY,BX] Wx
    [BX,BJ]). Each low-res value is written once: deterministic, no atomics; pixels on a tile's
    border are recomputed by its neighbour (a few rows/columns per tile)."""
    n = tl.program_id(0)
    i_lo = tl.program_id(1) * BI
    j_lo = tl.program_id(2) * BJ
    y_start, y_stop = _pixel_range(i_lo, tl.minimum(i_lo + BI, h), inv_scale_h, H)
    x_start, x_stop = _pixel_range(j_lo, tl.minimum(j_lo + BJ, w), inv_scale_w, W)
    g_f = tl.load(gsums + n * 4)
    g_pt = tl.load(gsums + n * 4 + 1)
    g_p = tl.load(gsums + n * 4 + 2)
    acc = tl.zeros((BI, BJ), tl.float32)
    i = i_lo + tl.arange(0, BI)[:, None]
    j = j_lo + tl.arange(0, BJ)[None, :]
    for y0 in range(y_start, y_stop, BY):
        iy0, iy1, wy0, wy1 = linear_taps(y0 + tl.arange(0, BY)[None, :], scale_h, h)
        wy_t = _tap_matrix(i, iy0, iy1, wy0, wy1)  # [BI, BY]
        for x0 in range(x_start, x_stop, BX):
            ix0, ix1, wx0, wx1 = linear_taps(x0 + tl.arange(0, BX)[:, None], scale_w, w)
            wx = _tap_matrix(j, ix0, ix1, wx0, wx1)  # [BX, BJ]
            Y = y0 + tl.arange(0, BY)[:, None]
            X = x0 + tl.arange(0, BX)[None, :]
            x, t, valid = _load_tile(pred, tgt, n, Y, X, h, w, H, W, scale_h, scale_w,
                                     sp_n, sp_h, sp_w, st_n, st_h, st_w)
            p, r, bce, q, alpha_t, mod, dmod = _pixel_terms(x, t, a_pos, a_neg, gamma, GAMMA_MODE)
            dfocal = alpha_t * (dmod * bce + mod * (p - t))
            g = tl.where(valid, g_f * dfocal + (g_pt * t + g_p) * (p * r), 0.0)  # [BY, BX]
            acc += tl.dot(wy_t, tl.dot(g, wx, input_precision=PRECISION), input_precision=PRECISION)
    tl.store(grad + n.to(tl.int64) * h * w + i * w + j, acc.to(grad.dtype.element_ty), mask=(i < h) & (j < w))


def _kernel_args(pred: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> tuple:
    """The targets as the kernels read them (bool viewed as bytes, no copy) and the arguments both
    kernels share: sizes, fp32 scales, focal constants, strides."""
    h, w = pred.shape[-2:]
    H, W = target.shape[-2:]
    a_pos, a_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    tgt = target.view(torch.uint8) if target.dtype == torch.bool else target
    return tgt, (h, w, H, W, scale(h, H), scale(w, W), a_pos, a_neg, gamma, *pred.stride(), *tgt.stride())


def _gamma_mode(gamma: float) -> int:
    return 0 if gamma == 0 else 2 if gamma == 2 else 1


def _sums(pred: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """[N, 4] float32: per mask, sums over the H x W pixels of (focal, p*t, p, t)."""
    N, H = pred.shape[0], target.shape[-2]
    rowsums = torch.empty((N, 4, H), dtype=torch.float32, device=pred.device)  # 4 floats per target row
    if N:
        tgt, shared = _kernel_args(pred, target, alpha, gamma)
        wrap_triton(_sums_kernel)[lambda meta: (N, triton.cdiv(H, meta["BY"]))](
            pred, tgt, rowsums, *shared, GAMMA_MODE=_gamma_mode(gamma))
    return rowsums.sum(-1)


def _sums_backward(grad_sums: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, alpha: float,
                   gamma: float) -> torch.Tensor:
    """d/d(pred) [N, h, w] in pred's dtype, from d/d(sums) [N, 4]."""
    N, h, w = pred.shape
    H, W = target.shape[-2:]
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)  # written once per element
    if N:
        tgt, shared = _kernel_args(pred, target, alpha, gamma)
        wrap_triton(_grad_kernel)[lambda meta: (N, triton.cdiv(h, meta["BI"]), triton.cdiv(w, meta["BJ"]))](
            pred, tgt, grad_sums.float().contiguous(), grad, scale(H, h), scale(W, w), *shared,
            GAMMA_MODE=_gamma_mode(gamma), PRECISION=dot_precision())
    return grad


def _setup_context(ctx, inputs, output):
    pred, target, ctx.alpha, ctx.gamma = inputs
    ctx.save_for_backward(pred, target)


def _backward(ctx, grad_sums):
    pred, target = ctx.saved_tensors
    return sums_backward(grad_sums, pred, target, ctx.alpha, ctx.gamma), None, None, None


sums_backward = plain_op("fastmaskformer::mask_loss_sums_backward", _sums_backward)
sums = op_with_autograd("fastmaskformer::mask_loss_sums", _sums, _backward, _setup_context)
