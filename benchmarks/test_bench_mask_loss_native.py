"""ops.mask_loss forward + backward on the CPU: reference eager, torch.compile(reference), native.

    pytest benchmarks/test_bench_mask_loss_native.py --benchmark-only

MaskFormer's shapes: 240 matched masks (8 images x 30 targets) and 30, with 128x128 logits against
512x512 targets. The reference takes seconds per call there, so it runs one timed round.
extra_info["peak_mb"] is the peak memory above the inputs. On a GPU machine the fused mask loss
is the Triton backend's (test_bench_mask_loss.py), and this file is skipped.
"""
import pytest
import torch

from conftest import DEVICE, op_variant, run_and_time
from fastmaskformer import ops
from fastmaskformer._ext import native_error

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the native mask loss is the CPU backend")
VARIANTS = ["reference", "compiled", pytest.param("native", marks=pytest.mark.skipif(
    native_error() is not None, reason=str(native_error())))]
# (N, h, H): masks, prediction side, target side.
SHAPES = [(240, 128, 512), (30, 128, 512)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_{}to{}".format(*s))
def test_mask_loss_forward_backward_cpu(benchmark, shape, variant):
    N, h, H = shape
    benchmark.group = f"mask_loss fwd+bwd cpu N={N} {h}->{H}"
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(N, h, h, generator=g).mul(3).requires_grad_()
    target = torch.rand(N, H, H, generator=g) > 0.5
    loss_fn = op_variant(ops.mask_loss, variant)

    def step():
        loss_mask, loss_dice = loss_fn(pred, target, float(N))
        return torch.autograd.grad(loss_mask + loss_dice, pred)[0]

    run_and_time(benchmark, variant, step, rounds=5 if variant == "native" else 1)
