"""The criterion with aux losses (6 decoder layers) and the full training step of the R50 recipe at
crop 512, in three variants: reference eager, torch.compile(reference criterion), and fused.

    pytest benchmarks/test_bench_train_step.py --benchmark-only
    FMF_BENCH_BATCH=2 FMF_BENCH_TARGETS=10 pytest ...   # shapes (defaults: B in {2, 8}, 10 targets/image)

Each benchmark records its peak memory above the inputs (extra_info["peak_mb"]). On the CPU the
step takes tens of seconds: rounds are few; the warm-up call absorbs torch.compile's compile.
"""
import os

import pytest
import torch

from fastmaskformer import MaskFormer
from fastmaskformer.criterion import SetCriterion
from fastmaskformer.matcher import HungarianMatcher
from fastmaskformer.modeling.maskformer import loss_weights

from conftest import DEVICE, run_and_time

BATCHES = [int(b) for b in os.environ.get("FMF_BENCH_BATCH", "2,8").split(",")]
TARGETS = int(os.environ.get("FMF_BENCH_TARGETS", "10"))
K, Q, L, CROP = 150, 100, 6, 512
ROUNDS = 3 if DEVICE == "cuda" else 1
VARIANTS = ["reference", "compiled", "fused"]


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
    crit = make_criterion(variant)

    def step():
        # Per-layer outputs as the model makes them: unbound views of one [L, ...] tensor.
        lg, mk = logits.unbind(0), masks.unbind(0)
        outputs = {"pred_logits": lg[-1], "pred_masks": mk[-1],
                   "aux_outputs": [{"pred_logits": lg[i], "pred_masks": mk[i]} for i in range(L - 1)]}
        loss = sum(crit(outputs, targets).values())
        loss.backward()
        logits.grad = masks.grad = None
        return loss.detach()

    run_and_time(benchmark, variant, step, rounds=ROUNDS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B", BATCHES)
def test_training_step(benchmark, B, variant):
    """Forward, matcher, criterion with aux losses, backward, for MaskFormer R50 (K=150) at 512x512."""
    benchmark.group = f"train step R50 B={B} N={TARGETS}/img crop {CROP}"
    torch.manual_seed(0)
    model = MaskFormer(K, backbone="resnet50", fused=variant == "fused").to(DEVICE).train()
    if variant == "compiled":
        model.criterion = make_criterion(variant)
    images = torch.rand(B, 3, CROP, CROP, device=DEVICE)
    targets = make_targets(B)

    def step():
        loss = sum(model.loss(model(images), targets).values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    run_and_time(benchmark, variant, step, rounds=ROUNDS)
