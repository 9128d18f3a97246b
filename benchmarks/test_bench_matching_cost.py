"""ops.matching_cost for a whole batch: the reference per-image loop against the native batched op.

    pytest benchmarks/test_bench_matching_cost.py --benchmark-only

MaskFormer's shapes: B=8 images, Q=100 queries, K=150 classes, 128x128 mask logits against 512x512
targets, 30 per image, and the same batch with ragged target counts (0 to 60). Runs on CUDA when
there is a GPU (one launch for the batch), else on the CPU. extra_info["peak_mb"] is the peak
memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, run_and_time
from fastmaskformer import ops
from fastmaskformer._ext import native_cuda_error, native_error

B, Q, K, h, H = 8, 100, 150, 128, 512
COUNTS = {"30 each": (30,) * B, "ragged 0-60": (0, 5, 60, 30, 1, 45, 12, 30)}
NATIVE_ERROR = native_cuda_error() if DEVICE == "cuda" else native_error()
VARIANTS = ["reference", pytest.param("native", marks=pytest.mark.skipif(NATIVE_ERROR is not None,
                                                                         reason=str(NATIVE_ERROR)))]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("counts", list(COUNTS))
def test_matching_cost(benchmark, counts, variant):
    ns = COUNTS[counts]
    benchmark.group = f"matching_cost B={B} Q={Q} K={K} {h}->{H}, targets {counts}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, Q, K + 1, generator=g).to(DEVICE)
    masks = torch.randn(B, Q, h, h, generator=g).mul(3).to(DEVICE)
    labels = [torch.randint(0, K, (n,), generator=g).to(DEVICE) for n in ns]
    targets = [(torch.rand(n, H, H, generator=g) > 0.5).to(DEVICE) for n in ns]
    run_and_time(benchmark, variant,
                 lambda: ops.matching_cost(logits, masks, labels, targets, 1.0, 20.0, 1.0, backend=variant))
