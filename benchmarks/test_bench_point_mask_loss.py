"""ops.point_mask_loss, forward + backward: reference eager, torch.compile(reference), and the fused
backend of the device: triton on CUDA, native (C++/OpenMP) on the CPU.

    pytest benchmarks/test_bench_point_mask_loss.py --benchmark-only

Mask2Former's criterion shapes: N = 10 predictions (the initial one and 9 decoder layers) x B images
x 10 matched targets, 128x128 logits against 512x512 bool targets, 12544 points per mask (drawn
uniformly here: where the criterion's importance sampling puts them does not change the work). The
reference converts the targets to float32 before sampling them (4 bytes per pixel), so its peak
grows with N x 512 x 512. extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops
from fastmaskformer._ext import native_error

VARIANTS = OP_VARIANTS + [pytest.param("native", marks=pytest.mark.skipif(
    DEVICE != "cpu" or native_error() is not None, reason="the native point mask loss is the CPU backend"))]
POINTS, LOW, HIGH = 12544, 128, 512


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [2, 8], ids=lambda b: f"B{b}")
def test_point_mask_loss_forward_backward(benchmark, batch, variant):
    N = 10 * batch * 10
    benchmark.group = f"point_mask_loss fwd+bwd {DEVICE} N={N} {LOW}->{HIGH} P={POINTS}"
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(N, LOW, LOW, generator=g).mul(3).to(DEVICE).requires_grad_()
    target = (torch.rand(N, HIGH, HIGH, generator=g) > 0.5).to(DEVICE)
    coords = torch.rand(N, POINTS, 2, generator=g).to(DEVICE)
    loss_fn = op_variant(ops.point_mask_loss, variant)

    def step():
        loss_mask, loss_dice = loss_fn(pred, target, coords, float(N))
        return torch.autograd.grad(loss_mask + loss_dice, pred)[0]

    slow = DEVICE == "cpu" and variant in ("reference", "compiled")
    run_and_time(benchmark, variant, step, rounds=1 if slow else 5)
