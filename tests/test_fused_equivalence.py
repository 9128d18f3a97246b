"""fused=True against fused=False end to end: the same model and batch give identical matchings,
the same losses and the same gradients of every parameter (issue: fused=True end to end).

On the CPU, "auto" composes the native backends (matching cost, mask loss, LAP); the second variant
forces the Triton kernels (run by the interpreter here) for the mask loss and the mask logits. On a
GPU, "cuda" runs the model there: Triton mask logits and loss, the CUDA cost and the CUDA solver.
"""
import pytest
import torch

from fastmaskformer import MaskFormer, ops

from tolerances import assert_close

VARIANTS = {
    "auto": {},
    "triton": {"FASTMASKFORMER_BACKEND_MASK_LOSS": "triton", "FASTMASKFORMER_BACKEND_MASK_LOGITS": "triton"},
    "cuda": {},
}


def tiny_model():
    torch.manual_seed(0)
    return MaskFormer(num_classes=4, backbone="resnet18", num_queries=6, hidden_dim=32, mask_dim=16, nheads=2,
                      dim_feedforward=32, dec_layers=3, dropout=0.0, conv_dim=32)


def batch(sizes, image_hw, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(sizes), 3, *image_hw, generator=g)
    targets = []
    for n in sizes:
        masks = torch.rand(n, *image_hw, generator=g) > 0.6
        if n:
            masks[0] = False  # an all-zero target mask
        targets.append({"labels": torch.randint(0, 4, (n,), generator=g), "masks": masks})
    return images, targets


def step(model, fused, images, targets):
    """Losses, the matching of every decoder layer, and every parameter's gradient."""
    model.fused = fused
    model.zero_grad(set_to_none=True)
    outputs = model(images)
    layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}] + outputs["aux_outputs"]
    indices = model.matcher.match_layers(layers, targets)
    losses = model.loss(outputs, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, indices, grads


CASES = {
    "two images": ([3, 1], (64, 64), 0),
    "one empty image, non-square": ([0, 2], (64, 96), 1),
    "no targets at all": ([0, 0], (64, 64), 2),
    "N close to Q": ([5], (96, 64), 3),
}
# The interpreter is slow: the Triton variant runs the two cases that differ most.
PARAMS = [pytest.param(v, c, id=f"{v}-{c}", marks=[pytest.mark.gpu] if v == "cuda" else [])
          for v in VARIANTS for c in CASES if v != "triton" or c in ("two images", "one empty image, non-square")]


@pytest.mark.parametrize("variant,case", PARAMS)
def test_fused_matches_reference(variant, case, monkeypatch):
    if variant == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = "cuda" if variant == "cuda" else "cpu"
    sizes, image_hw, seed = CASES[case]
    for k, v in VARIANTS[variant].items():
        monkeypatch.setenv(k, v)
    model = tiny_model().to(device).train()
    images, targets = batch(sizes, image_hw, seed)
    images, targets = images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]
    ref_losses, ref_idx, ref_grads = step(model, False, images, targets)
    fused_losses, fused_idx, fused_grads = step(model, True, images, targets)
    for layer, (a, b) in enumerate(zip(ref_idx, fused_idx)):
        for img, ((r1, c1), (r2, c2)) in enumerate(zip(a, b)):
            assert torch.equal(r1.cpu(), r2.cpu()) and torch.equal(c1.cpu(), c2.cpu()), f"layer {layer} image {img}"
    assert ref_losses.keys() == fused_losses.keys()
    for k in ref_losses:
        assert_close(fused_losses[k], ref_losses[k], what=k)
    assert ref_grads.keys() == fused_grads.keys()
    for n in ref_grads:
        assert_close(fused_grads[n], ref_grads[n], what=n, grad=True)


def test_fused_cpu_path_uses_the_native_backends():
    """On the CPU, fused=True composes the native cost, LAP and mask loss (mask logits stay a BLAS einsum)."""
    images, targets = batch([2, 1], (64, 64), 0)
    outputs = tiny_model()(images)
    labels, masks = [t["labels"] for t in targets], [t["masks"] for t in targets]
    cost, sizes = ops.matching_cost(outputs["pred_logits"], outputs["pred_masks"], labels, masks)
    pred = outputs["pred_masks"][0, :2]
    chosen = {
        "matching_cost": ops.matching_cost.choose("auto", (outputs["pred_logits"], outputs["pred_masks"], labels, masks), {}),
        "linear_sum_assignment": ops.linear_sum_assignment.choose("auto", (cost, sizes), {}),
        "mask_loss": ops.mask_loss.choose("auto", (pred, masks[0], 2.0), {}),
    }
    assert {k: b.name for k, b in chosen.items()} == {k: "native" for k in chosen}
