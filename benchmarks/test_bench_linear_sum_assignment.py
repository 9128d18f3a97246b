"""ops.linear_sum_assignment for a batch of B=16 images of Q=100 queries and N targets: the scipy
loop (the reference), the lapjv backend (padded to square, a thread pool) and the native batched
solver; with a GPU, a CUDA cost solved on the device against copying it to the host first.

    pytest benchmarks/test_bench_linear_sum_assignment.py --benchmark-only

The costs are uniform in [0, 1) (float32, as the matcher produces them). The microsecond-scale
calls are timed over many rounds: the median is what the report shows.
"""
import pytest
import torch

from conftest import DEVICE, run_and_time
from fastmaskformer import ops

B, Q = 16, 100
NS = [10, 50, 100]
ROUNDS = 200
VARIANTS = ["scipy", "lapjv", "native"] + (["host+native"] if DEVICE == "cuda" else [])


def solver(variant: str):
    if variant == "scipy":
        return ops.linear_sum_assignment.reference
    if variant == "host+native":  # what a CUDA cost costs without the device solver
        return lambda cost, sizes: ops.linear_sum_assignment(cost.cpu(), sizes, backend="native")
    return lambda cost, sizes: ops.linear_sum_assignment(cost, sizes, backend=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("N", NS, ids=lambda n: f"N{n}")
def test_linear_sum_assignment(benchmark, N, variant):
    benchmark.group = f"linear_sum_assignment B={B} Q={Q} N={N} {DEVICE}"
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(B, Q, N, generator=g).to(DEVICE)
    sizes = torch.full((B,), N)
    solve = solver(variant)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    run_and_time(benchmark, variant, lambda: solve(cost, sizes), rounds=ROUNDS)
