"""The native batched linear assignment solver (fastmaskformer._C) as the "native" backend of
linear_sum_assignment: the whole batch in one call with the GIL released, images solved in
parallel on the CPU, or one thread block per image on the GPU (a CUDA cost never leaves the device).
Results live on the cost's device."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from fastmaskformer._ext import native_cuda_error, native_error

from ..linear_sum_assignment import Assignment
from ..linear_sum_assignment import linear_sum_assignment as op

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The CUDA kernel keeps one image's per-column state in shared memory (its kMaxSide).
CUDA_MAX_SIDE = 1024


def stack_problems(costs: Sequence[torch.Tensor]):
    """A list of [Q, N_b] costs as one padded [B, Q, Nmax] batch (a strided view) and its sizes."""
    sizes = torch.tensor([c.shape[1] for c in costs], dtype=torch.int64)
    # pad_sequence pads the leading dim, so pad the transposes [N_b, Q] and transpose back.
    return pad_sequence([c.t() for c in costs], batch_first=True).transpose(1, 2), sizes


def _uniform_list(costs: Sequence[torch.Tensor]) -> Optional[str]:
    first = costs[0]
    for b, c in enumerate(costs):
        if c.shape[0] != first.shape[0] or c.dtype != first.dtype or c.device != first.device:
            return (f"a list of costs must share rows, dtype and device: cost[{b}] is {tuple(c.shape)} "
                    f"{c.dtype} on {c.device}, cost[0] is {tuple(first.shape)} {first.dtype} on {first.device}")
    return None


def supports(cost, sizes=None) -> Optional[str]:
    if isinstance(cost, (list, tuple)):
        if not cost:
            return None
        why = _uniform_list(cost)
        if why is not None:
            return why
        cost, sides = cost[0], (cost[0].shape[0], max(c.shape[1] for c in cost))
    else:
        sides = cost.shape[1:]
    if cost.dtype not in DTYPES:
        return f"dtype {cost.dtype} (takes {[str(d) for d in DTYPES]})"
    if cost.device.type == "cuda":
        if native_cuda_error() is not None:
            return native_cuda_error()
        if max(sides) > CUDA_MAX_SIDE:
            return f"the CUDA solver takes up to {CUDA_MAX_SIDE} rows and columns, got {tuple(sides)}"
    elif cost.device.type != "cpu":
        return f"device {cost.device} (takes cpu and cuda)"
    return None


def linear_sum_assignment_native(cost, sizes=None) -> Assignment:
    if isinstance(cost, (list, tuple)):
        if not cost:
            return []
        cost, sizes = stack_problems(cost)
    sizes = torch.as_tensor(sizes)
    if sizes.device.type != "cpu" or sizes.dtype != torch.int64:
        sizes = sizes.to("cpu", torch.int64)
    if cost.shape[0] == 0:
        return []
    pairs = torch.ops.fastmaskformer.linear_sum_assignment(cost, sizes)
    Q = cost.shape[1]
    return split_pairs(pairs, [n if n < Q else Q for n in sizes.tolist()])


def split_pairs(pairs: torch.Tensor, counts: List[int]) -> Assignment:
    """The packed [2, >= sum(counts)] pairs as one (rows, cols) pair of views per image."""
    total = sum(counts)
    return list(zip(pairs[0, :total].split_with_sizes(counts), pairs[1, :total].split_with_sizes(counts)))


if native_error() is None:
    @torch.library.register_fake("fastmaskformer::linear_sum_assignment")
    def _linear_sum_assignment_fake(cost, sizes):
        return cost.new_empty((2, cost.shape[0] * min(cost.shape[1], cost.shape[2])), dtype=torch.int64)


# "auto" rules, from measurements on this project's shared 2-core CPU (AMD EPYC, torch 2.14, other
# jobs running; median per call, speed-up over the scipy loop = the reference, in the same run):
#   B x Q x N        reference   native          lapjv (never picked by "auto")
#   1 x 1 x 1           31 us    21 us (1.5x)      95 us (0.3x)
#   1 x 100 x 10        35 us    23 us (1.6x)     152 us (0.2x)
#   16 x 100 x 10      319 us    48 us (6.7x)     1.66 ms (0.19x)
#   16 x 100 x 50      973 us   138 us (7.0x)     2.62 ms (0.37x)
#   16 x 100 x 100    9.07 ms   1.58 ms (5.7x)    3.03 ms (3.0x)
#   96 x 100 x 50     14.7 ms   2.1 ms (7.0x)     31.6 ms (0.5x)
# (benchmarks/results/linear_sum_assignment_cpu.md). native is the fastest at every size, so it
# takes every CPU call it supports. lapjv pays for padding to a square and beats the reference only
# on near-square problems, where native beats it too. For a CUDA cost "auto" picks the device
# solver (no host copy); its speed against copying to the host and solving there has not been
# measured yet (no GPU was lent): benchmarks/test_bench_linear_sum_assignment.py times both.
op.register("native", linear_sum_assignment_native, available=native_error, supports=supports, priority=30)
