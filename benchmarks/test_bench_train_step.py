"""The criterion with aux losses (6 decoder layers) and the full training step, at crop 512.

- criterion: reference eager, torch.compile(reference criterion), fused.
- training step of the MaskFormer R50 recipe, of the debug model (configs/debug.yaml's sizes) and
  of Mask2Former R50 (its point-sampled loss): reference and fused, each eager and with ``train.compile`` (``model.compile_training()``: the forward and the
  criterion's losses compiled, the matcher eager).

    pytest benchmarks/test_bench_train_step.py --benchmark-only
    FMF_BENCH_BATCH=2 FMF_BENCH_TARGETS=10 pytest ...   # shapes (defaults: B in {2, 8}, 10 targets/image)

Each benchmark records its peak memory above the inputs (extra_info["peak_mb"]). On the CPU a step
takes up to tens of seconds: 3 timed rounds (1 for the R50 step at B=8, which the report's round
column shows); the warm-up call absorbs torch.compile's compilation.
"""
import os

import pytest
import torch

from fastmaskformer import Mask2Former, MaskFormer
from fastmaskformer.criterion import SetCriterion
from fastmaskformer.matcher import HungarianMatcher
from fastmaskformer.modeling.maskformer import loss_weights

from conftest import DEVICE, criterion_step, run_and_time

BATCHES = [int(b) for b in os.environ.get("FMF_BENCH_BATCH", "2,8").split(",")]
TARGETS = int(os.environ.get("FMF_BENCH_TARGETS", "10"))
K, Q, L, CROP = 150, 100, 6, 512
ROUNDS = 3
VARIANTS = ["reference", "compiled", "fused"]
STEP_VARIANTS = ["reference", "reference+compile", "fused", "fused+compile"]
MODELS = {
    "R50": (MaskFormer, dict(backbone="resnet50")),
    "debug": (MaskFormer, dict(backbone="resnet18", num_queries=8, hidden_dim=32, mask_dim=32, conv_dim=32, nheads=2,
                               dim_feedforward=64, dec_layers=2)),
    "Mask2Former R50": (Mask2Former, dict(backbone="resnet50")),
}


def make_targets(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, K, (TARGETS,), generator=g).to(DEVICE),
             "masks": (torch.rand(TARGETS, CROP, CROP, generator=g) > 0.5).to(DEVICE)} for _ in range(B)]


def make_criterion(variant):
    fused = variant == "fused"
    crit = SetCriterion(K, HungarianMatcher(1, 20, 1, fused=fused), loss_weights(1, 20, 1, L - 1), 0.1,
                        ("labels", "masks"), fused=fused).to(DEVICE)
    return torch.compile(crit) if variant == "compiled" else crit


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B", BATCHES)
def test_criterion_all_layers(benchmark, B, variant):
    """Matcher + losses on the final and 5 aux outputs, forward and backward."""
    benchmark.group = f"criterion L={L} B={B} N={TARGETS}/img Q={Q} 128->512"
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(L, B, Q, K + 1, generator=g).to(DEVICE).requires_grad_()
    masks = torch.randn(L, B, Q, CROP // 4, CROP // 4, generator=g).to(DEVICE).requires_grad_()
    targets = make_targets(B)
    run_and_time(benchmark, variant, criterion_step(make_criterion(variant), logits, masks, targets), rounds=ROUNDS)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_training_step(benchmark, arch, B, variant):
    """Forward, matcher, criterion with aux losses, backward, for MaskFormer (K=150) at 512x512."""
    benchmark.group = f"train step {arch} B={B} N={TARGETS}/img crop {CROP}"
    torch._dynamo.reset()
    torch.manual_seed(0)
    cls, kwargs = MODELS[arch]
    model = cls(K, fused=variant.startswith("fused"), **kwargs).to(DEVICE).train()
    if variant.endswith("+compile"):
        model.compile_training()
    images = torch.rand(B, 3, CROP, CROP, device=DEVICE)
    targets = make_targets(B)

    def step():
        loss = sum(model.loss(model(images), targets).values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    heavy = DEVICE == "cpu" and "R50" in arch and B > 2
    run_and_time(benchmark, variant, step, rounds=1 if heavy else ROUNDS)
