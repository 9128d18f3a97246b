"""Point sampling helpers of the Mask2Former matcher and criterion against independent float64 NumPy
formulas (tests/independent_points.py): point_sample on and outside the borders, importance sampling
with a fixed generator, the matching costs and the losses (values, gradients, fp32 under autocast,
empty inputs) and argument errors."""
import numpy as np
import pytest
import torch

from fastmaskformer.point_sampling import (importance_points, point_mask_cost, point_mask_loss, point_sample,
                                           random_point_coords, uncertain_point_coords)

import independent_points as ind
from tolerances import assert_close


def test_point_sample_matches_bilinear_loop():
    x = torch.randn(2, 3, 5, 4)
    coords = torch.rand(2, 7, 2) * 1.4 - 0.2
    coords[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.125, 0.1], [1.2, 0.5]])  # corners, a centre, outside
    out = point_sample(x, coords)
    assert out.shape == (2, 3, 7)
    xn, cn = x.double().numpy(), coords.double().numpy()
    expected = np.array([[[ind.bilinear_sample(xn[n, c], *cn[n, p]) for p in range(7)] for c in range(3)]
                         for n in range(2)])
    assert_close(out, torch.from_numpy(expected), what="point_sample")
    assert_close(out[0, :, 2], x[0, :, 0, 0], what="pixel centre (0, 0)")


def test_random_point_coords_shape_range_and_generator():
    a = random_point_coords(3, 11, generator=torch.Generator().manual_seed(5))
    b = random_point_coords(3, 11, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 11, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert (a >= 0).all() and (a < 1).all()


@pytest.mark.parametrize("num_points, oversample, importance", [(10, 3.0, 0.75), (7, 2.5, 0.5), (6, 1.0, 1.0),
                                                                (5, 3.0, 0.0)])
def test_uncertain_point_coords_follows_the_official_recipe(num_points, oversample, importance):
    logits = torch.randn(3, 1, 6, 5) * 3
    out = uncertain_point_coords(logits, num_points, oversample, importance, generator=torch.Generator().manual_seed(1))
    # The same draws, in the same order, from an identically seeded generator.
    g = torch.Generator().manual_seed(1)
    S, k = int(num_points * oversample), int(importance * num_points)
    candidates = torch.rand(3, S, 2, generator=g)
    fresh = torch.rand(3, num_points - k, 2, generator=g)
    assert out.shape == (3, num_points, 2)
    ln, cn = logits.double().numpy(), candidates.double().numpy()
    for n in range(3):
        uncertainty = np.array([-abs(ind.bilinear_sample(ln[n, 0], *cn[n, s])) for s in range(S)])
        order = np.argsort(-uncertainty, kind="stable")[:k]
        assert np.allclose(np.sort(uncertainty[order]), np.sort([-abs(ind.bilinear_sample(ln[n, 0], *c))
                                                                for c in out[n, :k].double().numpy()]))
        assert sorted(map(tuple, out[n, :k].tolist())) == sorted(map(tuple, candidates[n, order].tolist()))
    assert torch.equal(out[:, k:], fresh)


def test_uncertain_point_coords_float32_under_a_float64_default():
    # The top-k's gather moves each (x, y) pair as one 8-byte word: the points must be float32 even
    # where torch.rand would otherwise draw float64.
    logits = torch.randn(2, 1, 5, 5)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = uncertain_point_coords(logits, 6, generator=torch.Generator().manual_seed(2))
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(2)
    candidates = torch.rand(2, 18, 2, generator=g, dtype=torch.float32)
    fresh = torch.rand(2, 2, 2, generator=g, dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out[:, 4:], fresh)
    for n in range(2):  # the kept candidates are candidates of that mask
        assert set(map(tuple, out[n, :4].tolist())) <= set(map(tuple, candidates[n].tolist()))


def test_importance_points_draw_the_same_numbers_into_a_workspace():
    """The fused criterion draws every layer's candidates into one reused buffer: groups drawn in turn
    into a dirty workspace larger than any of them give the very points of fresh draws."""
    source = torch.randn(5, 6, 7) * 3
    rank = lambda c: -point_sample(source[:c.shape[0], None], c)[:, 0].abs()  # noqa: E731
    workspace = torch.full((5 * 24 * 2 + 11,), float("nan"))
    g_fresh, g_ws = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for n in (5, 2, 4):
        want = importance_points(n, 8, 3.0, 0.75, rank, generator=g_fresh)
        got = importance_points(n, 8, 3.0, 0.75, rank, generator=g_ws, workspace=workspace)
        assert torch.equal(got, want), n
    assert torch.equal(g_ws.get_state(), g_fresh.get_state())
    assert not workspace[:5 * 24 * 2].isnan().any() and workspace[5 * 24 * 2:].isnan().all()  # drawn there


def test_uncertain_point_coords_global_rng_and_no_grad():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    torch.manual_seed(3)
    a = uncertain_point_coords(logits, 8)
    torch.manual_seed(3)
    b = uncertain_point_coords(logits, 8)
    assert torch.equal(a, b) and not a.requires_grad
    assert uncertain_point_coords(logits[:0], 8).shape == (0, 8, 2)


def test_point_mask_cost_matches_formula():
    x = torch.randn(4, 9) * 3
    t = (torch.rand(3, 9) > 0.5).float()
    t[1] = torch.rand(9)  # bilinearly sampled targets are fractions
    bce, dice = point_mask_cost(x, t)
    e_bce, e_dice = ind.point_costs(x.double().numpy(), t.double().numpy())
    assert bce.shape == dice.shape == (4, 3) and bce.dtype == dice.dtype == torch.float32
    assert_close(bce, torch.from_numpy(e_bce), what="point BCE cost")
    assert_close(dice, torch.from_numpy(e_dice), what="point dice cost")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_bce, low_dice = point_mask_cost(x.bfloat16(), t.bool())
    assert low_bce.dtype == torch.float32
    expected_low = ind.point_costs(x.bfloat16().double().numpy(), t.bool().double().numpy())
    assert_close(low_bce, torch.from_numpy(expected_low[0]), what="bf16 input, fp32 cost")
    empty_bce, empty_dice = point_mask_cost(x, t[:0])
    assert empty_bce.shape == empty_dice.shape == (4, 0)


def test_point_mask_loss_matches_formula_and_gradient():
    x = (torch.randn(3, 8) * 2).requires_grad_(True)
    t = torch.rand(3, 8)
    loss_mask, loss_dice = point_mask_loss(x, t, 2.5)
    e_mask, e_dice = ind.point_losses(x.detach().double().numpy(), t.double().numpy(), 2.5)
    assert_close(loss_mask, torch.tensor(e_mask), what="point BCE loss")
    assert_close(loss_dice, torch.tensor(e_dice), what="point dice loss")
    loss_mask.backward()
    # d/dx mean_p BCE(x, t) / num_masks = (sigmoid(x) - t) / P / num_masks
    expected = (ind.sigmoid(x.detach().double().numpy()) - t.double().numpy()) / 8 / 2.5
    assert_close(x.grad, torch.from_numpy(expected), what="d loss_mask", grad=True)


def test_point_mask_loss_empty_and_autocast():
    x = torch.randn(0, 8, requires_grad=True)
    loss_mask, loss_dice = point_mask_loss(x, torch.zeros(0, 8), 1.0)
    assert loss_mask.item() == 0.0 and loss_dice.item() == 0.0
    (loss_mask + loss_dice).backward()  # an image without targets still backpropagates
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm, ld = point_mask_loss(torch.randn(2, 5).bfloat16(), torch.ones(2, 5, dtype=torch.bool), 1.0)
    assert lm.dtype == ld.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="input: expected a 4-d"):
        point_sample(torch.randn(2, 5, 5), torch.rand(2, 3, 2))
    with pytest.raises(ValueError, match="coords: expected \\[N, P, 2\\] with N = 2"):
        point_sample(torch.randn(2, 1, 5, 5), torch.rand(3, 3, 2))
    with pytest.raises(TypeError, match="input: expected dtype"):
        point_sample(torch.zeros(2, 1, 5, 5, dtype=torch.bool), torch.rand(2, 3, 2))
    with pytest.raises(ValueError, match="logits: expected \\[N, 1, h, w\\]"):
        uncertain_point_coords(torch.randn(2, 3, 5, 5), 4)
    with pytest.raises(ValueError, match="num_points"):
        uncertain_point_coords(torch.randn(2, 1, 5, 5), 0)
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertain_point_coords(torch.randn(2, 1, 5, 5), 4, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertain_point_coords(torch.randn(2, 1, 5, 5), 4, importance_sample_ratio=1.5)
    with pytest.raises(ValueError, match="target_points: expected \\[N, 9\\]"):
        point_mask_cost(torch.randn(4, 9), torch.rand(3, 8))
    with pytest.raises(ValueError, match="target_points: expected the shape"):
        point_mask_loss(torch.randn(3, 8), torch.rand(2, 8), 1.0)
    with pytest.raises(ValueError, match="num_masks: expected > 0"):
        point_mask_loss(torch.randn(3, 8), torch.rand(3, 8), 0)
    with pytest.raises(ValueError, match="meta"):
        point_mask_loss(torch.randn(3, 8), torch.rand(3, 8, device="meta"), 1.0)
