"""ops.mask_loss, forward + backward: reference eager, torch.compile(reference), triton (CUDA only).

    pytest benchmarks/test_bench_mask_loss.py --benchmark-only

MaskFormer's shapes on CUDA: N matched masks with 128x128 logits against 512x512 targets; a
smaller set on the CPU. extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops

# (N, h, H): masks, prediction side, target side.
SHAPES = [(16, 128, 512), (64, 128, 512), (320, 128, 512)] if DEVICE == "cuda" else [(4, 32, 128), (16, 32, 128)]


@pytest.mark.parametrize("variant", OP_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_{}to{}".format(*s))
def test_mask_loss_forward_backward(benchmark, shape, variant):
    N, h, H = shape
    benchmark.group = f"mask_loss fwd+bwd N={N} {h}->{H}"
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(N, h, h, generator=g).mul(3).to(DEVICE).requires_grad_()
    target = (torch.rand(N, H, H, generator=g) > 0.5).to(DEVICE)
    loss_fn = op_variant(ops.mask_loss, variant)

    def step():
        loss_mask, loss_dice = loss_fn(pred, target, float(N))
        return torch.autograd.grad(loss_mask + loss_dice, pred)[0]

    run_and_time(benchmark, variant, step)
