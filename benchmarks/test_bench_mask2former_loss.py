"""Mask2Former's matcher + criterion over its 10 predictions (the initial queries and 9 layers),
forward and backward, at the R50 shapes (Q=100, K=150, mask logits 128x128, targets 512x512,
10 targets per image), B in {2, 8}:

- reference: the official point-sampled matcher and loss (12544 points), plain PyTorch;
- compiled: the same under torch.compile;
- fused: the same with fused=True (batched point cost, fused point loss, batched LAP);
- full+fused: mask_sampling="full", the exact full-resolution BCE + dice through the fused mask loss
  and matching cost, no sampling. The question this answers: does the exact loss now cost no more
  than the sampled one?

    pytest benchmarks/test_bench_mask2former_loss.py --benchmark-only
"""
import os

import pytest
import torch

from conftest import DEVICE, criterion_step, run_and_time
from fastmaskformer.criterion import SetCriterion
from fastmaskformer.matcher import HungarianMatcher
from fastmaskformer.modeling.meta_arch import loss_weights

BATCHES = [int(b) for b in os.environ.get("FMF_BENCH_BATCH", "2,8").split(",")]
TARGETS, K, Q, L, CROP, POINTS = 10, 150, 100, 10, 512, 12544
VARIANTS = ["reference", "compiled", "fused", "full+fused"]


def make_criterion(variant):
    fused = "fused" in variant
    full = variant.startswith("full")
    points = 0 if full else POINTS
    bce = dict(alpha=-1.0, gamma=0.0)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=points, fused=fused, **bce)
    crit = SetCriterion(K, matcher, loss_weights(2.0, 5.0, 5.0, L - 1), 0.1, ("labels", "masks"), num_points=points,
                        fused=fused, focal_alpha=bce["alpha"], focal_gamma=bce["gamma"]).to(DEVICE)
    return torch.compile(crit) if variant == "compiled" else crit  # the point draws run eagerly


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B", BATCHES)
def test_mask2former_criterion(benchmark, B, variant):
    benchmark.group = f"mask2former criterion L={L} B={B} N={TARGETS}/img Q={Q} 128->512"
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(L, B, Q, K + 1, generator=g).to(DEVICE).requires_grad_()
    masks = torch.randn(L, B, Q, CROP // 4, CROP // 4, generator=g).to(DEVICE).requires_grad_()
    targets = [{"labels": torch.randint(0, K, (TARGETS,), generator=g).to(DEVICE),
                "masks": (torch.rand(TARGETS, CROP, CROP, generator=g) > 0.5).to(DEVICE)} for _ in range(B)]
    run_and_time(benchmark, variant, criterion_step(make_criterion(variant), logits, masks, targets), rounds=5)
