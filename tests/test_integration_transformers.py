"""use_fused(model): transformers' MaskFormer loss module swapped for fastmaskformer's fused criterion,
compared with transformers' own MaskFormerLoss (values and gradients w.r.t. every layer's logits)."""
import pytest
import torch
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig
from transformers.models.maskformer.configuration_maskformer import MaskFormerDetrConfig
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from fastmaskformer.integrations.transformers import FusedMaskFormerLoss, use_fused
from tolerances import assert_close

K = 6


def _batch(B, Q, L, h, w, sizes, counts, seed):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(L, B, Q, K + 1, generator=g, requires_grad=True)
    masks = torch.randn(L, B, Q, h, w, generator=g, requires_grad=True)
    mask_labels = [(torch.rand(n, *s, generator=g) > 0.6).float() for n, s in zip(counts, sizes)]
    class_labels = [torch.randint(0, K, (n,), generator=g) for n in counts]
    return cls, masks, mask_labels, class_labels


def _losses_and_grads(loss_module, cls, masks, mask_labels, class_labels):
    aux = [{"class_queries_logits": cls[i], "masks_queries_logits": masks[i]} for i in range(cls.shape[0] - 1)]
    losses = loss_module(masks[-1], cls[-1], mask_labels, class_labels, aux)
    grads = torch.autograd.grad(sum(losses.values()), (cls, masks))
    return losses, grads


@pytest.mark.parametrize("case", [
    dict(B=2, Q=8, L=3, h=16, w=16, sizes=[(64, 64)] * 2, counts=[3, 5], seed=0),
    # An image without targets. (transformers' image processor pads every image's masks to the batch
    # size; given masks of different sizes, its matcher would resize each unpadded while its losses
    # use them padded. fastmaskformer pads first, then matches and computes the losses, as the
    # official MaskFormer does, so only same-size masks are compared here.)
    dict(B=3, Q=10, L=2, h=12, w=20, sizes=[(48, 80)] * 3, counts=[4, 0, 7], seed=1),
    dict(B=1, Q=5, L=1, h=9, w=13, sizes=[(37, 51)], counts=[5], seed=2),  # odd sizes, every query matched
])
@pytest.mark.parametrize("fused", [True, False])
def test_loss_matches_transformers(case, fused):
    batch = _batch(**case)
    matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    theirs = MaskFormerLoss(K, matcher, {}, eos_coef=0.1)
    ours = FusedMaskFormerLoss(K, {}, 0.1, cost_class=1.0, cost_mask=20.0, cost_dice=1.0, fused=fused)
    expected, expected_grads = _losses_and_grads(theirs, *batch)
    actual, actual_grads = _losses_and_grads(ours, *batch)
    assert list(actual) == list(expected)  # same keys, same order
    for key in expected:
        assert_close(actual[key], expected[key], what=key)
    for name, a, e in zip(("class logits", "mask logits"), actual_grads, expected_grads):
        assert_close(a, e, what=f"d loss / d {name}", grad=True)


def _tiny_model():
    bb = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    dec = MaskFormerDetrConfig(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                               num_queries=6, encoder_layers=0, dropout=0.0)
    cfg = MaskFormerConfig(backbone_config=bb, decoder_config=dec, num_labels=K, fpn_feature_size=32,
                           mask_feature_size=32, no_object_weight=0.2, mask_weight=10.0, dice_weight=2.0)
    torch.manual_seed(0)
    return MaskFormerForInstanceSegmentation(cfg)


def test_use_fused_in_model_forward():
    """The patched model's own forward (its loss weighting and sum) gives transformers' loss and
    parameter gradients; the loss module keeps transformers' weights and costs."""
    model = _tiny_model().train()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask_labels = [(torch.rand(n, 64, 64, generator=g) > 0.5).float() for n in (2, 3)]
    class_labels = [torch.randint(0, K, (n,), generator=g) for n in (2, 3)]

    def step():
        model.zero_grad()
        out = model(images, mask_labels=mask_labels, class_labels=class_labels)
        out.loss.backward()
        return out.loss.detach(), model.class_predictor.weight.grad.clone()

    expected_loss, expected_grad = step()
    assert use_fused(model) is model
    assert isinstance(model.criterion, FusedMaskFormerLoss)
    fused = model.criterion
    assert (fused.eos_coef, fused.matcher.cost_mask, fused.matcher.cost_dice) == (0.2, 10.0, 2.0)
    loss, grad = step()
    assert_close(loss, expected_loss, what="model loss")
    assert_close(grad, expected_grad, what="class_predictor grad", grad=True)


def test_use_fused_rejects_other_models():
    with pytest.raises(TypeError, match="model: expected a transformers MaskFormerForInstanceSegmentation"):
        use_fused(torch.nn.Linear(2, 2))


def test_mismatched_labels_are_named():
    loss = FusedMaskFormerLoss(K, {}, 0.1)
    with pytest.raises(ValueError, match=r"mask_labels, class_labels: expected one entry per image \(2\), got 1"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, K + 1), [torch.zeros(1, 8, 8)], [torch.zeros(1)])
