"""Pieces shared by the Triton kernels: F.interpolate's bilinear sampling rule, the autotune config
choice, the fp32 dot precision, and registration as torch.library ops with autograd."""
from __future__ import annotations

import os
from typing import Callable, List

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton  # torch >= 2.6, which setup.py requires

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(gpu: List[triton.Config], interpret: triton.Config) -> List[triton.Config]:
    """The autotune set: ``gpu`` on a GPU; one config under the interpreter, where timing is meaningless."""
    return [interpret] if INTERPRET else gpu


def fit_configs(dims: dict) -> Callable:
    """An ``early_config_prune`` dropping configs whose block ``name`` is >= 2x the extent of
    argument ``dims[name]`` (mostly masked lanes), keeping at least the smallest."""

    def prune(cfgs, named_args, **_):
        def fits(c):
            return all(c.kwargs[b] < 2 * max(int(named_args[a]), 1) or c.kwargs[b] <= 16 for b, a in dims.items())

        kept = [c for c in cfgs if fits(c)]
        return kept or [min(cfgs, key=lambda c: sum(c.kwargs[b] for b in dims))]

    return prune


def scale(n_in: int, n_out: int) -> float:
    """ATen's source/destination scale ``in / out`` as a correctly rounded fp32 division (Triton's
    in-kernel fp32 division is approximate, and a 1-ulp difference can move a tap)."""
    return float(np.float32(n_in) / np.float32(n_out))


def dot_precision() -> str:
    """The precision of fp32 tl.dot products, following torch's matmul setting. Under "highest" (the
    default: exact fp32 products) "tf32x3": three TF32 tensor-core products per dot, relative error
    ~1e-6, well inside the fp32 parity tolerance, and expected to be several times faster than
    "ieee" FMA loops (not measured here: no GPU). Under "high"/"medium", plain "tf32", as cuBLAS."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@triton.jit
def linear_taps(dst, scale, n_in):
    """F.interpolate(mode="bilinear", align_corners=False) along one axis, for output indices ``dst``:
    source taps (i0, i1) and weights (w0, w1). Mirrors csrc/include/fmf/index_rules.h."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0, so truncation is floor
    i1 = i0 + (i0 < n_in - 1).to(tl.int32)
    w1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - w1, w1


@triton.jit
def bilinear_sample(base, oy0, oy1, wy0, wy1, ox0, ox1, wx0, wx1, mask):
    """The bilinear value at the taps: ``base`` + row offsets (oy*) + column offsets (ox*), all
    broadcastable; loads in the input dtype and blends in fp32 in ATen's order."""
    v00 = tl.load(base + oy0 + ox0, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + oy0 + ox1, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + oy1 + ox0, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + oy1 + ox1, mask=mask, other=0.0).to(tl.float32)
    return wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)


def op_with_autograd(name: str, forward: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """``forward`` (type-annotated, launching kernels through ``wrap_triton``) as the torch.library op
    ``name`` with ``backward``: torch.compile traces through it."""
    op = triton_op(name, mutates_args=())(forward)
    op.register_autograd(backward, setup_context=setup_context)
    return op


def plain_op(name: str, fn: Callable) -> Callable:
    """``fn`` as a torch.library op without autograd (a backward kernel)."""
    return triton_op(name, mutates_args=())(fn)
