"""ops.ms_deform_attn, forward and forward + backward: reference eager, torch.compile(reference), and
the fused backend of the device: native (C++) on the CPU, triton on CUDA.

    pytest benchmarks/test_bench_ms_deform_attn.py --benchmark-only

Mask2Former R50's pixel-decoder encoder at crop 512: B=2, levels 64x64 / 32x32 / 16x16 (strides 8,
16, 32: S = 5376 value rows, and every row is a query, Lq = 5376), 8 heads, 4 points per level,
256 channels (dh = 32). Locations as the trained encoder makes them: each query's reference point
(its own pixel centre, shared by the levels) plus offsets of about two pixels of each level;
weights a softmax over the 12 points of a head. The level sizes are passed as a tuple of ints, as
the model passes them (the reference needs them on the host; under torch.compile a tensor would
break the graph). extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch

from conftest import DEVICE, OP_VARIANTS, op_variant, run_and_time
from fastmaskformer import ops
from fastmaskformer._ext import native_error

VARIANTS = OP_VARIANTS + [pytest.param("native", marks=pytest.mark.skipif(
    DEVICE != "cpu" or native_error() is not None, reason="the native ms_deform_attn is the CPU backend"))]
B, LEVELS, HEADS, POINTS, DH = 2, ((64, 64), (32, 32), (16, 16)), 8, 4, 32


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(LEVELS)
    # Reference points: the pixel centres of every level's rows, in [0, 1].
    ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                indexing="xy"), -1).reshape(-1, 2) for h, w in LEVELS])
    level_wh = shapes.flip(1).float()  # (w, h) per level
    offsets = torch.randn(B, S, HEADS, L, POINTS, 2, generator=g) * 2.0 / level_wh[:, None, :]
    loc = ref[None, :, None, None, None, :] + offsets
    weights = torch.randn(B, S, HEADS, L * POINTS, generator=g).softmax(-1).view(B, S, HEADS, L, POINTS)
    value = torch.randn(B, S, HEADS, DH, generator=g)
    return [t.to(DEVICE) for t in (value, shapes, starts, loc, weights)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_ms_deform_attn(benchmark, backward, variant):
    benchmark.group = (f"ms_deform_attn {'fwd+bwd' if backward else 'fwd'} {DEVICE} B={B} levels 64/32/16 "
                       f"heads={HEADS} points={POINTS} dh={DH}")
    value, _, starts, loc, weights = _inputs()
    fn = op_variant(ops.ms_deform_attn, variant)
    leaves = [t.requires_grad_(backward) for t in (value, loc, weights)]
    grad_out = torch.randn(B, loc.shape[1], HEADS * DH, device=DEVICE)

    def step():
        out = fn(leaves[0], LEVELS, starts, leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, grad_out) if backward else out

    slow = DEVICE == "cpu" and variant in ("reference", "compiled")
    with torch.set_grad_enabled(backward):
        run_and_time(benchmark, variant, step, rounds=2 if slow else 5)
