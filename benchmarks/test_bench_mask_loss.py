"""ops.mask_loss, forward + backward: reference eager, torch.compile(reference), and the fused
backend of the device: triton on CUDA, native (C++/OpenMP) on the CPU.

    pytest benchmarks/test_bench_mask_loss.py --benchmark-only

MaskFormer's shapes: N matched masks (e.g. 8 images x 30 targets = 240) with 128x128 logits against
512x512 targets. On the CPU the reference takes seconds per call there, so it runs one timed round.
extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops
from fastmaskformer._ext import native_error

VARIANTS = OP_VARIANTS + [pytest.param("native", marks=pytest.mark.skipif(
    DEVICE != "cpu" or native_error() is not None, reason="the native mask loss is the CPU backend"))]
# (N, h, H): masks, prediction side, target side.
SHAPES = [(16, 128, 512), (64, 128, 512), (320, 128, 512)] if DEVICE == "cuda" else [(30, 128, 512), (240, 128, 512)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_{}to{}".format(*s))
def test_mask_loss_forward_backward(benchmark, shape, variant):
    N, h, H = shape
    benchmark.group = f"mask_loss fwd+bwd {DEVICE} N={N} {h}->{H}"
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(N, h, h, generator=g).mul(3).to(DEVICE).requires_grad_()
    target = (torch.rand(N, H, H, generator=g) > 0.5).to(DEVICE)
    loss_fn = op_variant(ops.mask_loss, variant)

    def step():
        loss_mask, loss_dice = loss_fn(pred, target, float(N))
        return torch.autograd.grad(loss_mask + loss_dice, pred)[0]

    slow = DEVICE == "cpu" and variant in ("reference", "compiled")
    run_and_time(benchmark, variant, step, rounds=1 if slow else 5)
