"""transformers' MaskFormer loss against the same module after ``use_fused``: matcher and losses of
all decoder layers, forward and backward, as ``MaskFormerForInstanceSegmentation`` calls its
criterion (mask logits, class logits, mask_labels, class_labels, auxiliary predictions).

    pytest benchmarks/test_bench_transformers_loss.py --benchmark-only

MaskFormer-R50 shapes: B=8 images, Q=100 queries, K=150 classes, 6 decoder layers, 128x128 mask
logits against 512x512 float mask labels (as transformers' image processor makes them), 10 targets
per image. transformers' loss takes about a minute per call on the CPU, so it runs one timed round.
extra_info["peak_mb"] is the peak memory above the inputs.
"""
import pytest
import torch
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from conftest import DEVICE, run_and_time
from fastmaskformer.integrations.transformers import FusedMaskFormerLoss

B, Q, K, L, N, h, H = 8, 100, 150, 6, 10, 128, 512


def _loss(variant: str):
    if variant == "transformers":
        return MaskFormerLoss(K, MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0), {}, 0.1)
    return FusedMaskFormerLoss(K, {}, 0.1, cost_class=1.0, cost_mask=20.0, cost_dice=1.0, fused=True)


@pytest.mark.parametrize("variant", ["transformers", "use_fused"])
def test_transformers_maskformer_loss(benchmark, variant):
    benchmark.group = f"transformers MaskFormer loss L={L} B={B} N={N}/img Q={Q} {h}->{H} {DEVICE}"
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(L, B, Q, K + 1, generator=g).to(DEVICE).requires_grad_()
    masks = torch.randn(L, B, Q, h, h, generator=g).mul(3).to(DEVICE).requires_grad_()
    mask_labels = [(torch.rand(N, H, H, generator=g) > 0.5).float().to(DEVICE) for _ in range(B)]
    class_labels = [torch.randint(0, K, (N,), generator=g).to(DEVICE) for _ in range(B)]
    loss = _loss(variant).to(DEVICE)

    def step():
        aux = [{"class_queries_logits": cls[i], "masks_queries_logits": masks[i]} for i in range(L - 1)]
        losses = loss(masks[-1], cls[-1], mask_labels, class_labels, aux)
        return torch.autograd.grad(sum(losses.values()), (cls, masks))

    run_and_time(benchmark, variant, step, rounds=1 if variant == "transformers" else 3)
