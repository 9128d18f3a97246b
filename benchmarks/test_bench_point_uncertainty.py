"""ops.point_uncertainty (Mask2Former's importance sampling ranks its candidates by it): reference
eager, torch.compile(reference), and the fused backend of the device: triton on CUDA, native
(C++/OpenMP) on the CPU.

    pytest benchmarks/test_bench_point_uncertainty.py --benchmark-only

One decoder layer of Mask2Former's criterion at B images: the layer's logits [B x 100, 128, 128],
the 10 x B matched rows, 3 x 12544 uniform candidates per row. The reference is the official
recipe on a gathered copy of the matched rows (grid_sample on 2 coords - 1, then abs and negation);
the fused backends read the rows in place. extra_info["peak_mb"] is the peak memory above the
inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops

# The native point uncertainty is the CPU backend: timed where the benchmarks run on the CPU.
VARIANTS = OP_VARIANTS + (["native"] if DEVICE == "cpu" else [])
Q, CANDIDATES, LOW = 100, 3 * 12544, 128


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [2, 8], ids=lambda b: f"B{b}")
def test_point_uncertainty(benchmark, batch, variant):
    N = 10 * batch
    benchmark.group = f"point_uncertainty {DEVICE} rows={N} of {Q * batch} {LOW}x{LOW} S={CANDIDATES}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(Q * batch, LOW, LOW, generator=g).mul(3).to(DEVICE)
    rows = torch.randperm(Q * batch, generator=g)[:N].to(DEVICE)
    coords = torch.rand(N, CANDIDATES, 2, generator=g).to(DEVICE)
    fn = op_variant(ops.point_uncertainty, variant)
    run_and_time(benchmark, variant, lambda: fn(logits, coords, rows), rounds=20)
