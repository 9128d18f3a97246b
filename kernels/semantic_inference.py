"""Fused semantic inference: per-pixel class scores from low-resolution mask logits, back to back.

scores[b, k, p] = sum_q cls[b, q, k] * sigmoid(up(masks[b, q]))[p], with cls = softmax(logits)[..., :K]
(a tiny [B, Q, K] tensor computed by torch). Each program takes a tile of output pixels, computes
the upsampled sigmoid probabilities of a block of queries on the fly from the 4 bilinear taps, and
contracts them with the class probabilities in a tl.dot, like fused attention's second product.
Never materialized: the Q x H x W upsampled logits or probabilities; with return_labels, not even
the K x H x W scores (a running max/argmax over class blocks is kept per pixel instead).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import bilinear_sample, configs, dot_precision, fit_configs, linear_taps, plain_op, scale, wrap_triton

# Checked with ptxas for sm_90 (no GPU to time them): these use <= 255 registers with little or no
# spilling; software pipelining (num_stages > 1) of the gathers spills, so it is off.
_GPU = [triton.Config({"BP": bp, "BQ": bq, "BK": bk}, num_warps=8, num_stages=1)
        for bp, bq, bk in ((64, 16, 256), (32, 16, 256), (128, 16, 128), (64, 32, 128), (128, 32, 128))]


@triton.autotune(configs=configs(_GPU, triton.Config({"BP": 256, "BQ": 32, "BK": 32})),
                 key=["Q", "K", "h", "w", "H", "W", "RETURN_LABELS"],
                 prune_configs_by={"early_config_prune": fit_configs({"BQ": "Q", "BK": "K"})})
@triton.jit
def _semantic_kernel(cls, masks, out, Q, K, h, w, H, W, scale_h, scale_w, sc_b, sc_q, sc_k, sm_b, sm_q, sm_y, sm_x,
                     RETURN_LABELS: tl.constexpr, PRECISION: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
                     BK: tl.constexpr):
    """Program (tile of BP output pixels, image b): for each block of BK classes, acc [BK, BP] =
    sum over query blocks of cls^T [BK, BQ] . probs [BQ, BP]; stores it (scores [B, K, H, W]), or
    folds it into a running max/argmax (labels [B, H, W]; ties keep the lowest class, as torch.argmax)."""
    b = tl.program_id(1).to(tl.int64)
    pixel = tl.program_id(0) * BP + tl.arange(0, BP)
    valid = pixel < H * W
    iy0, iy1, wy0, wy1 = linear_taps(pixel // W, scale_h, h)
    ix0, ix1, wx0, wx1 = linear_taps(pixel % W, scale_w, w)
    oy0 = (iy0.to(tl.int64) * sm_y)[None, :]
    oy1 = (iy1.to(tl.int64) * sm_y)[None, :]
    ox0 = (ix0.to(tl.int64) * sm_x)[None, :]
    ox1 = (ix1.to(tl.int64) * sm_x)[None, :]
    best = tl.full((BP,), float("-inf"), tl.float32)
    best_k = tl.zeros((BP,), tl.int32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        acc = tl.zeros((BK, BP), tl.float32)
        for q0 in range(0, Q, BQ):
            q = q0 + tl.arange(0, BQ)
            base = masks + b * sm_b + q.to(tl.int64)[:, None] * sm_q  # [BQ, 1]
            live = (q[:, None] < Q) & valid[None, :]
            x = bilinear_sample(base, oy0, oy1, wy0[None, :], wy1[None, :], ox0, ox1, wx0[None, :], wx1[None, :], live)
            probs = tl.where(live, tl.sigmoid(x), 0.0)  # [BQ, BP]
            c = tl.load(cls + b * sc_b + q[None, :] * sc_q + k[:, None] * sc_k,
                        mask=(k[:, None] < K) & (q[None, :] < Q), other=0.0)  # [BK, BQ]
            acc = tl.dot(c, probs, acc, input_precision=PRECISION)
        if RETURN_LABELS:
            acc = tl.where(k[:, None] < K, acc, float("-inf"))
            block_best = tl.max(acc, 0)
            block_k = tl.argmax(acc, 0, tie_break_left=True) + k0
            better = block_best > best  # strict: an equal score in a later block keeps the lower class
            best_k = tl.where(better, block_k, best_k)
            best = tl.where(better, block_best, best)
        else:
            dst = out + (b * K + k.to(tl.int64)[:, None]) * H * W + pixel[None, :]
            tl.store(dst, acc, mask=(k[:, None] < K) & valid[None, :])
    if RETURN_LABELS:
        tl.store(out + b * H * W + pixel, best_k.to(tl.int64), mask=valid)


def _forward(pred_logits: torch.Tensor, pred_masks: torch.Tensor, output_size: List[int],
             return_labels: bool) -> torch.Tensor:
    B, Q, h, w = pred_masks.shape
    H, W = int(output_size[0]), int(output_size[1])
    cls = pred_logits.float().softmax(-1)[..., :-1]  # [B, Q, K] view: read through its strides
    K = cls.shape[-1]
    shape, dtype = ((B, H, W), torch.int64) if return_labels else ((B, K, H, W), torch.float32)
    out = torch.empty(shape, dtype=dtype, device=pred_masks.device)
    if out.numel() and Q:
        wrap_triton(_semantic_kernel)[lambda meta: (triton.cdiv(H * W, meta["BP"]), B)](
            cls, pred_masks, out, Q, K, h, w, H, W, scale(h, H), scale(w, W), *cls.stride(), *pred_masks.stride(),
            RETURN_LABELS=return_labels, PRECISION=dot_precision())
    elif out.numel():  # no queries: every score is 0 and argmax is class 0
        out.zero_()
    return out


_op = plain_op("fastmaskformer::semantic_inference_triton", _forward)


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, output_size, return_labels: bool = False):
    """``ops.semantic_inference`` on the fused kernel: scores [B, K, H, W] float32, or labels [B, H, W] int64."""
    return _op(pred_logits, pred_masks, [int(s) for s in output_size], bool(return_labels))
