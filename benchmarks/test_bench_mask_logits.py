"""ops.mask_logits for all decoder layers, forward and forward + backward: reference einsum eager,
torch.compile(reference), triton (CUDA only).

    pytest benchmarks/test_bench_mask_logits.py --benchmark-only

MaskFormer's shapes on CUDA (L=6 layers, Q=100 queries, C=256 channels, 128x128 pixels, B=2..16)
in fp32 and bf16; a smaller set on the CPU. extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops

L, Q, C = 6, 100, 256
SHAPES = [(2, 128), (16, 128)] if DEVICE == "cuda" else [(2, 32)]  # (B, h = w)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", OP_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}px".format(*s))
def test_mask_logits(benchmark, shape, dtype, variant, backward):
    B, h = shape
    benchmark.group = f"mask_logits {'fwd+bwd' if backward else 'fwd'} L={L} B={B} Q={Q} C={C} {h}x{h} {dtype}"
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(L, B, Q, C, generator=g).to(DEVICE, dtype).requires_grad_(backward)
    pixels = torch.randn(B, C, h, h, generator=g).to(DEVICE, dtype).requires_grad_(backward)
    logits_fn = op_variant(ops.mask_logits, variant)

    def step():
        out = logits_fn(embed, pixels)
        return torch.autograd.grad(out, (embed, pixels), torch.ones_like(out)) if backward else out

    run_and_time(benchmark, variant, step)
