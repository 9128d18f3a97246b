"""Mask2Former with fused=True against fused=False, and its exact full-resolution loss (issue:
Mask2Former, fast).

- Equivalence: the same model and batch, the same random points (the global RNG reseeded before each
  step, so the matcher's uniform points and the loss's importance-sampled points are identical), give
  identical matchings on every prediction, the same losses and every parameter's gradient within the
  tolerance table; for mask_sampling="points" and "full".
- mask_sampling="full" computes BCE + dice at full resolution: the sigmoid focal loss and cost with
  gamma 0 and no alpha weighting, checked against torch's own BCE on the upsampled logits.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmaskformer import Mask2Former, ops

from tolerances import assert_close

BACKENDS = ["reference"] + [b for b in ("native", "triton") if ops.mask_loss.backends[b].available() is None]


def tiny(mask_sampling, seed=0):
    torch.manual_seed(seed)
    return Mask2Former(4, backbone="resnet18", num_queries=6, hidden_dim=32, mask_dim=32, nheads=2,
                       dim_feedforward=32, dec_layers=3, conv_dim=32, enc_layers=1, enc_nheads=2, enc_n_points=2,
                       enc_dim_feedforward=32, num_points=64, mask_sampling=mask_sampling)


def batch(sizes, hw, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(sizes), 3, *hw, generator=g)
    targets = [{"labels": torch.randint(0, 4, (n,), generator=g), "masks": torch.rand(n, *hw, generator=g) > 0.6}
               for n in sizes]
    return images, targets


def step(model, fused, images, targets):
    model.fused = fused
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same points for both paths
    outputs = model(images)
    layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}] + outputs["aux_outputs"]
    torch.manual_seed(7)
    indices = model.matcher.match_layers(layers, targets)
    torch.manual_seed(7)
    losses = model.loss(outputs, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, indices, grads


@pytest.mark.parametrize("mask_sampling", ["points", "full"])
@pytest.mark.parametrize("sizes,hw", [([3, 1], (64, 64)), ([0, 2], (64, 96))])
def test_fused_matches_reference(mask_sampling, sizes, hw):
    model = tiny(mask_sampling).train()
    images, targets = batch(sizes, hw, 0)
    ref_losses, ref_idx, ref_grads = step(model, False, images, targets)
    losses, idx, grads = step(model, True, images, targets)
    assert len(idx) == 4  # the initial queries and 3 layers
    for layer, (a, b) in enumerate(zip(ref_idx, idx)):
        for img, ((r1, c1), (r2, c2)) in enumerate(zip(a, b)):
            assert torch.equal(r1.cpu(), r2.cpu()) and torch.equal(c1.cpu(), c2.cpu()), f"layer {layer} image {img}"
    assert ref_losses.keys() == losses.keys()
    for k in ref_losses:
        assert_close(losses[k], ref_losses[k], what=k)
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], what=n, grad=True)


def test_full_sampling_builds_full_resolution_bce_matcher_and_loss():
    model = tiny("full")
    assert model.matcher.num_points == 0 and model.criterion.num_points == 0
    assert (model.matcher.alpha, model.matcher.gamma) == (-1.0, 0.0)
    assert (model.criterion.focal_alpha, model.criterion.focal_gamma) == (-1.0, 0.0)
    with pytest.raises(ValueError, match="mask_sampling: expected one of"):
        tiny("sampled")


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_with_gamma_0_and_no_alpha_is_bce(backend):
    """The full-resolution loss of mask_sampling="full" against torch's BCE and dice on the upsampled
    logits, on every backend."""
    x = (torch.randn(3, 7, 9) * 3).requires_grad_()
    t = torch.rand(3, 26, 35) > 0.5
    loss_mask, loss_dice = ops.mask_loss(x, t, 2.0, -1.0, 0.0, backend=backend)
    up = F.interpolate(x[:, None], size=(26, 35), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    tf = t.flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(up, tf, reduction="none").mean(1).sum() / 2.0
    s = up.sigmoid()
    dice = (1 - (2 * (s * tf).sum(1) + 1) / (s.sum(1) + tf.sum(1) + 1)).sum() / 2.0
    assert_close(loss_mask, bce, what="loss_mask")
    assert_close(loss_dice, dice, what="loss_dice")
    g1, = torch.autograd.grad(loss_mask + loss_dice, x)
    g2, = torch.autograd.grad(bce + dice, x)
    assert_close(g1, g2, what="gradient", grad=True)


@pytest.mark.parametrize("backend", ["reference"] + (["native"] if ops.matching_cost.backends["native"].available()
                                                     is None else []))
def test_matching_cost_with_gamma_0_and_no_alpha_is_mean_bce(backend):
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 6, 7, generator=g) * 3
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    targets = [torch.rand(2, 12, 14, generator=g) > 0.5, torch.rand(1, 12, 14, generator=g) > 0.5]
    cost, _ = ops.matching_cost(logits, masks, labels, targets, 0.0, 1.0, 0.0, -1.0, 0.0, backend=backend)
    for b in range(2):
        t = F.interpolate(targets[b][:, None].float(), size=(6, 7), mode="nearest")[:, 0].flatten(1)  # [N, P]
        x = masks[b].flatten(1)  # [Q, P]
        want = F.binary_cross_entropy_with_logits(x[:, None].expand(-1, len(t), -1), t[None].expand(5, -1, -1),
                                                  reduction="none").mean(-1)
        assert_close(cost[b, :, :len(t)], want, what=f"image {b}")
