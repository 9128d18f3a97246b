"""ops.semantic_inference, scores and labels: reference eager, torch.compile(reference), triton
(CUDA only).

    pytest benchmarks/test_bench_semantic_inference.py --benchmark-only

MaskFormer's shapes on CUDA (Q=100 queries, K=150 classes, 128x128 masks to 512x512, B=2..16); a
smaller set on the CPU. extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops

Q, K = 100, 150
SHAPES = [(2, 128, 512), (16, 128, 512)] if DEVICE == "cuda" else [(1, 32, 128)]  # (B, h, H)


@pytest.mark.parametrize("return_labels", [False, True], ids=["scores", "labels"])
@pytest.mark.parametrize("variant", OP_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}to{}".format(*s))
def test_semantic_inference(benchmark, shape, variant, return_labels):
    B, h, H = shape
    benchmark.group = f"semantic_inference {'labels' if return_labels else 'scores'} B={B} Q={Q} K={K} {h}->{H}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, Q, K + 1, generator=g).to(DEVICE)
    masks = torch.randn(B, Q, h, h, generator=g).mul(4).to(DEVICE)
    infer = op_variant(ops.semantic_inference, variant)
    run_and_time(benchmark, variant, lambda: infer(logits, masks, (H, H), return_labels))
