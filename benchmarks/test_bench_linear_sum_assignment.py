"""ops.linear_sum_assignment for a batch of B=16 images of Q=100 queries and N targets.

The baseline ("scipy") is what the official matcher runs: scipy's linear_sum_assignment on each
image's float32 NumPy array, in a plain loop, nothing else. Against it: our reference op (the same
loop behind the op's checks and conversions), the lapjv backend (padded to square, a thread pool)
and the native batched solver; with a GPU, a CUDA cost solved on the device against copying it to
the host first.

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
VARIANTS = ["scipy", "reference", "lapjv", "native"] + (["host+native"] if DEVICE == "cuda" else [])


def solver(variant: str):
    if variant == "scipy":  # the official matcher's loop: the solve alone, per image
        from scipy.optimize import linear_sum_assignment

        def loop(cost, sizes):
            arrays = [c[:, :n] for c, n in zip(cost.float().cpu().numpy(), sizes.tolist())]
            return lambda: [linear_sum_assignment(c) for c in arrays]

        return loop
    if variant == "reference":
        return lambda cost, sizes: lambda: ops.linear_sum_assignment(cost, sizes, backend="reference")
    if variant == "host+native":  # what a CUDA cost costs without the device solver
        return lambda cost, sizes: lambda: ops.linear_sum_assignment(cost.cpu(), sizes, backend="native")
    return lambda cost, sizes: lambda: ops.linear_sum_assignment(cost, sizes, backend=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("N", NS, ids=lambda n: f"N{n}")
def test_linear_sum_assignment(benchmark, N, variant):
    benchmark.group = f"linear_sum_assignment B={B} Q={Q} N={N} {DEVICE}"
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(B, Q, N, generator=g).to(DEVICE)
    sizes = torch.full((B,), N)
    solve = solver(variant)(cost, sizes)  # a call with everything but the timed work done
    benchmark.extra_info["threads"] = torch.get_num_threads()
    run_and_time(benchmark, variant, solve, rounds=ROUNDS)
