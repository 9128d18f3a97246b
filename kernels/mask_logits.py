"""Mask logits of every decoder layer in one launch: logits[l, b, q] = E[l, b, q, :] . F[b] (a GEMM).

Fuses: the L per-layer einsums into one batched GEMM per image b, whose rows are the (l, q) pairs
[L*Q, C] and whose right operand is F[b] read in place as [C, h*w] through its strides.
Never materialized: a copy of F per layer, a contiguous copy of E or F (any strides are read
directly), or the [B, L*Q, h*w] product in another layout (it is written in [L, B, Q, h, w] order).
Accumulates in fp32 and writes the inputs' dtype. Backward is two cuBLAS products (torch.einsum):
dE = dO . F^T and dF = sum_l E^T . dO. cuBLAS is the assumed faster choice for these plain GEMMs;
it has not been measured against a Triton backward (no GPU was available when this was written).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, configs, dot_precision, fit_configs, op_with_autograd, wrap_triton

# Checked with ptxas for sm_90 (no GPU to time them): none of these spills in fp32 or bf16.
_GPU = [triton.Config({"BM": bm, "BN": bn, "BK": 32, "GROUP_M": 8}, num_warps=nw, num_stages=3)
        for bm, bn, nw in ((128, 128, 8), (128, 64, 8), (64, 128, 8), (64, 64, 4))]


@triton.autotune(configs=configs(_GPU, triton.Config({"BM": 32, "BN": 64, "BK": 32, "GROUP_M": 2})),
                 key=["M", "HW", "C"], prune_configs_by={"early_config_prune": fit_configs({"BM": "M", "BN": "HW"})})
@triton.jit
def _mask_logits_kernel(emb, pix, out, B, Q, M, C, HW, Wd, se_l, se_b, se_q, se_c, sf_b, sf_c, sf_y, sf_x,
                        FLAT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Program (tile of rows m = l*Q + q [BM] x pixels [BN], image b). Tiles are visited in groups of
    GROUP_M row tiles so the F[b] columns they share stay in L2."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(HW, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    m = pid_m * BM + tl.arange(0, BM)
    pixel = pid_n * BN + tl.arange(0, BN)
    layer = (m // Q).to(tl.int64)
    query = (m % Q).to(tl.int64)
    k = tl.arange(0, BK)
    a_ptrs = emb + (layer * se_l + b.to(tl.int64) * se_b + query * se_q)[:, None] + k[None, :] * se_c  # [BM, BK]
    if FLAT:  # F[b] is [C, h*w] with unit pixel stride: contiguous, vectorizable loads
        f_cols = pixel
    else:
        f_cols = (pixel // Wd) * sf_y + (pixel % Wd) * sf_x
    f_ptrs = pix + b.to(tl.int64) * sf_b + k[:, None] * sf_c + f_cols[None, :]  # [BK, BN]
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, C, BK):
        a = tl.load(a_ptrs, mask=(m[:, None] < M) & (k[None, :] < C - k0), other=0.0)
        f = tl.load(f_ptrs, mask=(k[:, None] < C - k0) & (pixel[None, :] < HW), other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic
            a = a.to(tl.float32)
            f = f.to(tl.float32)
        acc = tl.dot(a, f, acc, input_precision=PRECISION)
        a_ptrs += BK * se_c
        f_ptrs += BK * sf_c
    rows = (layer * B + b) * Q * HW + query * HW  # output row starts in [L, B, Q, h*w]
    tl.store(out + rows[:, None] + pixel[None, :], acc.to(out.dtype.element_ty),
             mask=(m[:, None] < M) & (pixel[None, :] < HW))


def _forward(mask_embed: torch.Tensor, pixel_embed: torch.Tensor) -> torch.Tensor:
    """mask_embed [L, B, Q, C], pixel_embed [B, C, h, w] -> [L, B, Q, h, w]."""
    L, B, Q, C = mask_embed.shape
    h, w = pixel_embed.shape[-2:]
    out = torch.empty((L, B, Q, h, w), dtype=mask_embed.dtype, device=mask_embed.device)
    M, HW = L * Q, h * w
    flat = pixel_embed.stride(-1) == 1 and pixel_embed.stride(-2) == w
    if out.numel():
        wrap_triton(_mask_logits_kernel)[lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(HW, meta["BN"]), B)](
            mask_embed, pixel_embed, out, B, Q, M, C, HW, w, *mask_embed.stride(), *pixel_embed.stride(),
            FLAT=flat, PRECISION=dot_precision(), UPCAST=INTERPRET)
    return out


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    mask_embed, pixel_embed = ctx.saved_tensors
    d_embed = torch.einsum("lbqhw,bchw->lbqc", grad, pixel_embed)
    d_pixel = torch.einsum("lbqc,lbqhw->bchw", mask_embed, grad)
    return d_embed, d_pixel


_op = op_with_autograd("fastmaskformer::mask_logits_triton", _forward, _backward, _setup_context)


def mask_logits(mask_embed: torch.Tensor, pixel_embed: torch.Tensor) -> torch.Tensor:
    """``ops.mask_logits`` on the Triton GEMM: [L, B, Q, C] -> [L, B, Q, h, w], or [B, Q, C] -> [B, Q, h, w]."""
    if mask_embed.dim() == 3:
        return _op(mask_embed[None], pixel_embed)[0]
    return _op(mask_embed, pixel_embed)
