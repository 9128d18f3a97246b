"""use_fused(model): transformers' MaskFormer and Mask2Former loss modules swapped for fastmaskformer's
fused criterion, compared with transformers' own MaskFormerLoss and Mask2FormerLoss (values and
gradients w.r.t. every layer's logits; Mask2Former's random points made the same on both sides)."""
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
    with pytest.raises(TypeError, match="model: expected a transformers MaskFormerForInstanceSegmentation or "
                                        "Mask2FormerForUniversalSegmentation"):
        use_fused(torch.nn.Linear(2, 2))


def test_mismatched_labels_are_named():
    loss = FusedMaskFormerLoss(K, {}, 0.1)
    with pytest.raises(ValueError, match=r"mask_labels, class_labels: expected one entry per image \(2\), got 1"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, K + 1), [torch.zeros(1, 8, 8)], [torch.zeros(1)])


# -- Mask2Former: point-sampled matching and losses -----------------------------------------------
_TORCH_RAND = torch.rand


class SharedPoints:
    """Stands in for ``torch.rand`` during a Mask2Former loss call, so that transformers' loss and
    fastmaskformer's draw the same points although they draw them in different groupings: the
    matcher's uniform points (transformers: [1, P, 2] per image and layer; fastmaskformer: all
    layers' and images' at once) come from one pool in (layer, image) order, the loss's candidates
    [N, S, 2] and fresh uniform points [N, P - k, 2] from one list each, in layer order (both sides
    go final layer, then aux 0, 1, ...). A draw of any other shape fails the test."""

    def __init__(self, layers, images, matched, P, oversample_ratio, importance_sample_ratio, seed):
        g = torch.Generator().manual_seed(seed)
        rand = _TORCH_RAND  # torch.rand itself may be a SharedPoints by now
        self.P, self.S = P, int(P * oversample_ratio)
        self.fresh_points = P - int(importance_sample_ratio * P)
        assert len({self.P, self.S, self.fresh_points}) == 3, "the draws must be told apart by their shape"
        self.match = rand(layers * images, P, 2, generator=g)
        self.candidates = [rand(matched, self.S, 2, generator=g) for _ in range(layers)]
        self.fresh = [rand(matched, self.fresh_points, 2, generator=g) for _ in range(layers)]
        self.used = {"match": 0, "candidates": 0, "fresh": 0}

    def __call__(self, *size, device=None, generator=None, dtype=None, out=None):
        into = out
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        n = shape[0]
        if shape[1:] == (self.P, 2):
            out, self.used["match"] = self.match[self.used["match"]:self.used["match"] + n], self.used["match"] + n
        elif shape[1:] in ((self.S, 2), (self.fresh_points, 2)):
            kind = "candidates" if shape[1] == self.S else "fresh"
            out = getattr(self, kind)[self.used[kind]]
            self.used[kind] += 1
        else:
            raise AssertionError(f"unexpected torch.rand{shape} during the loss")
        assert out.shape == shape, f"torch.rand{shape}: the shared points have shape {tuple(out.shape)}"
        return out.to(device) if into is None else into.copy_(out)


M2F = dict(P=50, oversample_ratio=3.0, importance_sample_ratio=0.75)


def _m2f_loss_config(**kw):
    from transformers import Mask2FormerConfig
    return Mask2FormerConfig(num_labels=K, train_num_points=M2F["P"], oversample_ratio=M2F["oversample_ratio"],
                             importance_sample_ratio=M2F["importance_sample_ratio"], backbone_config=ResNetConfig(
                                 out_features=["stage1", "stage2", "stage3", "stage4"]), **kw)


def _shared_points(monkeypatch, layers, counts, Q, seed=5):
    matched = sum(min(Q, n) for n in counts)
    points = SharedPoints(layers, len(counts), matched, seed=seed, **M2F)
    monkeypatch.setattr(torch, "rand", points)
    return points


@pytest.mark.parametrize("case", [
    dict(B=2, Q=8, L=3, h=16, w=16, sizes=[(64, 64)] * 2, counts=[3, 5], seed=0),
    dict(B=3, Q=10, L=2, h=12, w=20, sizes=[(48, 80)] * 3, counts=[4, 0, 7], seed=1),  # an image without targets
    dict(B=1, Q=5, L=1, h=9, w=13, sizes=[(37, 51)], counts=[5], seed=2),  # odd sizes, every query matched
])
@pytest.mark.parametrize("fused", [True, False])
def test_mask2former_loss_matches_transformers(case, fused, monkeypatch):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
    batch = _batch(**case)
    cfg = _m2f_loss_config(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1)
    theirs = Mask2FormerLoss(cfg, {})
    ours = FusedMaskFormerLoss(K, {}, 0.1, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, fused=fused,
                               num_points=M2F["P"], oversample_ratio=M2F["oversample_ratio"],
                               importance_sample_ratio=M2F["importance_sample_ratio"])
    results = []
    for loss in (theirs, ours):
        points = _shared_points(monkeypatch, case["L"], case["counts"], case["Q"])
        results.append(_losses_and_grads(loss, *batch))
        assert points.used == {"match": case["L"] * case["B"], "candidates": case["L"], "fresh": case["L"]}
    (expected, expected_grads), (actual, actual_grads) = results
    assert list(actual) == list(expected)  # same keys, same order
    for key in expected:
        assert_close(actual[key], expected[key], what=key)
    for name, a, e in zip(("class logits", "mask logits"), actual_grads, expected_grads):
        assert_close(a, e, what=f"d loss / d {name}", grad=True)


def _tiny_m2f_model():
    from transformers import Mask2FormerForUniversalSegmentation
    cfg = _m2f_loss_config(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
                           encoder_layers=1, decoder_layers=3, num_attention_heads=4, dim_feedforward=64,
                           num_queries=6, no_object_weight=0.2, mask_weight=4.0, dice_weight=3.0, class_weight=1.5)
    cfg.backbone_config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                                       layer_type="basic", out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(cfg)


def test_use_fused_in_mask2former_forward(monkeypatch):
    """The patched Mask2Former's own forward (its loss weighting and sum) gives transformers' loss and
    parameter gradients on the same points; the loss module keeps transformers' weights and points."""
    model = _tiny_m2f_model().train()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask_labels = [(torch.rand(n, 64, 64, generator=g) > 0.5).float() for n in (2, 3)]
    class_labels = [torch.randint(0, K, (n,), generator=g) for n in (2, 3)]

    def step():
        points = _shared_points(monkeypatch, 3, (2, 3), 6)  # 3 predictions: initial queries + 2 layers
        model.zero_grad()
        out = model(images, mask_labels=mask_labels, class_labels=class_labels)
        out.loss.backward()
        monkeypatch.undo()
        assert points.used == {"match": 6, "candidates": 3, "fresh": 3}
        return out.loss.detach(), model.class_predictor.weight.grad.clone()

    expected_loss, expected_grad = step()
    assert use_fused(model) is model
    assert isinstance(model.criterion, FusedMaskFormerLoss)
    fused = model.criterion
    assert (fused.eos_coef, fused.matcher.cost_class, fused.matcher.cost_mask, fused.matcher.cost_dice) == \
        (0.2, 1.5, 4.0, 3.0)
    assert (fused.criterion.num_points, fused.matcher.num_points, fused.criterion.oversample_ratio,
            fused.criterion.importance_sample_ratio) == (M2F["P"], M2F["P"], 3.0, 0.75)
    loss, grad = step()
    assert_close(loss, expected_loss, what="model loss")
    assert_close(grad, expected_grad, what="class_predictor grad", grad=True)
    assert use_fused(model, fused=False).criterion.criterion.num_points == M2F["P"]  # re-patching keeps the points
