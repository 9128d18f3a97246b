"""transformers' MaskFormer and Mask2Former losses against the same modules after ``use_fused``:
matcher and losses of all decoder layers, forward and backward, as ``MaskFormerForInstanceSegmentation``
and ``Mask2FormerForUniversalSegmentation`` call their criterion (mask logits, class logits,
mask_labels, class_labels, auxiliary predictions).

    pytest benchmarks/test_bench_transformers_loss.py --benchmark-only

MaskFormer-R50 shapes: B=8 images, Q=100 queries, K=150 classes, 6 decoder layers, 128x128 mask
logits against 512x512 float mask labels (as transformers' image processor makes them), 10 targets
per image. transformers' loss takes about a minute per call on the CPU, so it runs one timed round.
Mask2Former-R50 shapes: the same batch with 10 predictions (9 layers and the initial queries),
12544 points per mask, 3x oversampling, 75% importance-sampled, weights 2 / 5 / 5.
extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch
from transformers import Mask2FormerConfig, ResNetConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from conftest import DEVICE, run_and_time
from fastmaskformer.integrations.transformers import FusedMaskFormerLoss

B, Q, K, L, N, h, H = 8, 100, 150, 6, 10, 128, 512
L2, P = 10, 12544  # Mask2Former: predictions, points per mask


def _loss(variant: str, model: str = "maskformer"):
    if model == "mask2former":
        if variant == "transformers":
            cfg = Mask2FormerConfig(num_labels=K, train_num_points=P, backbone_config=ResNetConfig(
                out_features=["stage1", "stage2", "stage3", "stage4"]))
            return Mask2FormerLoss(cfg, {})
        return FusedMaskFormerLoss(K, {}, 0.1, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, fused=True, num_points=P,
                                   oversample_ratio=3.0, importance_sample_ratio=0.75)
    if variant == "transformers":
        return MaskFormerLoss(K, MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0), {}, 0.1)
    return FusedMaskFormerLoss(K, {}, 0.1, cost_class=1.0, cost_mask=20.0, cost_dice=1.0, fused=True)


@pytest.mark.parametrize("variant", ["transformers", "use_fused"])
@pytest.mark.parametrize("model", ["maskformer", "mask2former"])
def test_transformers_loss(benchmark, model, variant):
    layers = L2 if model == "mask2former" else L
    name = "Mask2Former" if model == "mask2former" else "MaskFormer"
    benchmark.group = f"transformers {name} loss L={layers} B={B} N={N}/img Q={Q} {h}->{H} {DEVICE}"
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(layers, B, Q, K + 1, generator=g).to(DEVICE).requires_grad_()
    masks = torch.randn(layers, B, Q, h, h, generator=g).mul(3).to(DEVICE).requires_grad_()
    mask_labels = [(torch.rand(N, H, H, generator=g) > 0.5).float().to(DEVICE) for _ in range(B)]
    class_labels = [torch.randint(0, K, (N,), generator=g).to(DEVICE) for _ in range(B)]
    loss = _loss(variant, model).to(DEVICE)

    def step():
        aux = [{"class_queries_logits": cls[i], "masks_queries_logits": masks[i]} for i in range(layers - 1)]
        losses = loss(masks[-1], cls[-1], mask_labels, class_labels, aux)
        return torch.autograd.grad(sum(losses.values()), (cls, masks))

    run_and_time(benchmark, variant, step, rounds=1 if variant == "transformers" else 3)
