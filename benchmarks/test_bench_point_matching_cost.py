"""ops.point_matching_cost for a whole batch: reference eager (a loop over images), torch.compile of
the reference, and the native batched op (C++ threads on the CPU, one launch on CUDA).

    pytest benchmarks/test_bench_point_matching_cost.py --benchmark-only

Mask2Former's matcher shapes, for one decoder layer: B in {2, 8} images, Q=100 queries, K=150 classes,
128x128 mask logits against 512x512 bool targets, 10 targets per image, 12544 uniform points per
image (shared by its queries and targets). The reference samples the logits into a [B, Q, P] float
tensor and converts each image's targets to float32 before sampling them ([N, 512, 512], 4 bytes a
pixel); the native op samples both inside the kernel. extra_info["peak_mb"] is the peak memory above
the inputs.
"""
import pytest
import torch

from conftest import DEVICE, op_variant, run_and_time
from fastmaskformer import ops
from fastmaskformer._ext import native_cuda_error, native_error

Q, K, LOW, HIGH, N, POINTS = 100, 150, 128, 512, 10, 12544
NATIVE_ERROR = native_cuda_error() if DEVICE == "cuda" else native_error()
VARIANTS = ["reference", "compiled", pytest.param("native", marks=pytest.mark.skipif(
    NATIVE_ERROR is not None, reason=str(NATIVE_ERROR)))]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [2, 8], ids=lambda b: f"B{b}")
def test_point_matching_cost(benchmark, batch, variant):
    benchmark.group = f"point_matching_cost {DEVICE} B={batch} Q={Q} K={K} {LOW}->{HIGH} N={N} P={POINTS}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, Q, K + 1, generator=g).to(DEVICE)
    masks = torch.randn(batch, Q, LOW, LOW, generator=g).mul(3).to(DEVICE)
    labels = [torch.randint(0, K, (N,), generator=g).to(DEVICE) for _ in range(batch)]
    targets = [(torch.rand(N, HIGH, HIGH, generator=g) > 0.5).to(DEVICE) for _ in range(batch)]
    coords = torch.rand(batch, POINTS, 2, generator=g).to(DEVICE)
    fn = op_variant(ops.point_matching_cost, variant)
    slow = DEVICE == "cpu" and variant in ("reference", "compiled")
    run_and_time(benchmark, variant, lambda: fn(logits, masks, labels, targets, coords, 2.0, 5.0, 5.0),
                 rounds=3 if slow else 5)
