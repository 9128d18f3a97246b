"""Mask2Former's point-sampled matcher and criterion (HungarianMatcher / SetCriterion with num_points > 0)
against independent float64 formulas on fixed points (tests/independent_points.py): the cost and
brute-force optimal matchings, the losses of every decoder layer, gradients, empty targets,
reproducibility with a generator, one host wait per fused step, MaskFormer's full-resolution path
untouched by num_points=0, argument errors, and a tiny Mask2Former whose loss falls."""
import numpy as np
import pytest
import torch

import fastmaskformer.criterion as criterion_module
import fastmaskformer.matcher as matcher_module
from fastmaskformer import Mask2Former, ops
from fastmaskformer.criterion import SetCriterion
from fastmaskformer.matcher import HungarianMatcher

import independent_points as ind
from test_criterion import expected_losses
from test_matcher import brute_force_min, make_batch
from test_sync import HostReads
from tolerances import assert_close

K = 4
WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def point_criterion(num_points=16, fused=False, seed=None, **kwargs):
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    matcher = HungarianMatcher(2, 5, 5, num_points=num_points, fused=fused, generator=gen())
    return SetCriterion(K, matcher, WEIGHTS, 0.1, num_points=num_points, fused=fused, generator=gen(), **kwargs)


def fixed_points(n, num_points, seed=0):
    """Points over the whole map and a little outside it (zero padding is part of the semantics)."""
    return torch.rand(n, num_points, 2, generator=torch.Generator().manual_seed(seed)) * 1.2 - 0.1


@pytest.fixture
def fixed_matcher_points(monkeypatch):
    """The matcher's uniform draw replaced by fixed points; returns the list of tensors it handed out."""
    drawn = []

    def draw(n, num_points, device=None, generator=None):
        drawn.append(fixed_points(n, num_points, seed=len(drawn)))
        return drawn[-1]
    monkeypatch.setattr(matcher_module, "random_point_coords", draw)
    return drawn


# ------------------------------------------------------------------------------------------- matcher
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("Q,sizes,hw,HW", [
    (5, [3, 0, 4], (4, 5), (16, 20)),   # predictions at 1/4 of the target size, an empty image
    (3, [4, 1], (5, 7), (11, 13)),      # Q < N, odd sizes
])
def test_matcher_is_optimal_on_fixed_points(fixed_matcher_points, fused, Q, sizes, hw, HW):
    P, B = 12, len(sizes)
    outputs, targets = make_batch(B, Q, K, sizes, hw, HW)
    aux, _ = make_batch(B, Q, K, sizes, hw, HW, seed=1)
    matcher = HungarianMatcher(2, 5, 5, num_points=P, fused=fused)
    per_layer = matcher.match_layers([outputs, aux], targets)
    points = fixed_matcher_points[0]
    assert len(fixed_matcher_points) == 1 and points.shape == (2 * B, P, 2)  # one draw: every layer and image
    for layer, (out, indices) in enumerate(zip((outputs, aux), per_layer)):
        cost, _ = ops.point_matching_cost(out["pred_logits"], out["pred_masks"], [t["labels"] for t in targets],
                                          [t["masks"] for t in targets], points[layer * B:(layer + 1) * B], 2, 5, 5)
        for b, ((rows, cols), n) in enumerate(zip(indices, sizes)):
            C = ind.point_matching_cost(out["pred_logits"][b].double().numpy(), out["pred_masks"][b].double().numpy(),
                                        targets[b]["labels"].numpy(), targets[b]["masks"].numpy(),
                                        points[layer * B + b].double().numpy(), 2, 5, 5)
            assert_close(cost[b, :, :n], torch.from_numpy(C), what=f"point cost, layer {layer} image {b}")
            assert torch.isinf(cost[b, :, n:]).all()
            assert len(rows) == min(Q, n) and len(set(cols.tolist())) == len(cols)
            if n:
                np.testing.assert_allclose(C[rows.numpy(), cols.numpy()].sum(), brute_force_min(C), rtol=1e-9)


def test_point_cost_is_fp32_under_autocast_and_from_bytes():
    outputs, targets = make_batch(2, 3, K, [2, 1], (4, 4), (8, 8))
    args = ([t["labels"] for t in targets], [t["masks"] for t in targets], fixed_points(2, 10))
    full, _ = ops.point_matching_cost(outputs["pred_logits"], outputs["pred_masks"], *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = ops.point_matching_cost(outputs["pred_logits"].bfloat16(), outputs["pred_masks"].bfloat16(), *args)
    assert low.dtype == torch.float32
    assert_close(low, full, torch.bfloat16, what="bf16 predictions")
    as_bytes, _ = ops.point_matching_cost(outputs["pred_logits"], outputs["pred_masks"], args[0],
                                          [m.to(torch.uint8) for m in args[1]], args[2])
    assert torch.equal(as_bytes, full)


@pytest.mark.parametrize("fused", [False, True])
def test_matcher_names_bad_labels_and_non_finite_predictions(fused):
    outputs, targets = make_batch(3, 4, 3, [2, 1, 2], (4, 4), (8, 8))
    matcher = HungarianMatcher(2, 5, 5, num_points=8, fused=fused)
    bad = [dict(t) for t in targets]
    bad[1]["labels"] = torch.tensor([3])
    with pytest.raises(ValueError, match=r"tgt_labels\[1\]: labels must lie in \[0, 3\)"):
        matcher(outputs, bad)
    outputs["pred_logits"][2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="image 2 contains NaN or Inf"):
        matcher(outputs, targets)


def test_matcher_points_come_from_the_generator():
    outputs, targets = make_batch(2, 8, K, [6, 5], (6, 6), (24, 24))
    run = lambda seed: HungarianMatcher(0, 1, 1, num_points=4, generator=torch.Generator().manual_seed(seed))(  # noqa
        outputs, targets)
    same = [torch.equal(c1, c2) for (_, c1), (_, c2) in zip(run(0), run(0))]
    assert all(same)
    differ = [not torch.equal(c1, c2) for s in range(1, 6) for (_, c1), (_, c2) in zip(run(0), run(s))]
    assert any(differ)  # 4 points cannot tell these masks apart the same way for every seed


# ------------------------------------------------------------------------------------------- losses
def test_point_mask_loss_op_matches_formula():
    g = torch.Generator().manual_seed(0)
    pred = (torch.randn(3, 5, 6, generator=g) * 3).requires_grad_(True)
    target = torch.rand(3, 11, 13, generator=g) > 0.5
    coords = fixed_points(3, 9)
    loss_mask, loss_dice = ops.point_mask_loss(pred, target, coords, 2.5)
    x = np.stack([ind.sample_masks(p[None], c)[0]
                  for p, c in zip(pred.detach().double().numpy(), coords.double().numpy())])
    t = np.stack([ind.sample_masks(m[None].astype(np.float64), c)[0]
                  for m, c in zip(target.numpy(), coords.double().numpy())])
    e_mask, e_dice = ind.point_losses(x, t, 2.5)
    assert loss_mask.dtype == loss_dice.dtype == torch.float32
    assert_close(loss_mask, torch.tensor(e_mask), what="point BCE loss")
    assert_close(loss_dice, torch.tensor(e_dice), what="point dice loss")
    loss_mask.backward()
    # d loss_mask / d logit = sum over points of bilinear tap weight x (sigmoid(x_p) - t_p) / P / num_masks
    expected = np.zeros(pred.shape)
    for n in range(3):
        for p, (cx, cy) in enumerate(coords[n].double().numpy()):
            for row, col, w in ind.bilinear_taps(cx, cy, 5, 6):
                expected[n, row, col] += w * (ind.sigmoid(x[n, p]) - t[n, p]) / 9 / 2.5
    assert_close(pred.grad, torch.from_numpy(expected), what="d loss_mask / d pred_masks", grad=True)
    tensor_n = ops.point_mask_loss(pred, target, coords, torch.tensor(2.5))
    assert_close(tensor_n[0], loss_mask, what="num_masks as a 0-d tensor")


@pytest.mark.parametrize("sizes", [[3, 0, 2], [1, 2]])
def test_criterion_losses_on_fixed_points(monkeypatch, fixed_matcher_points, sizes):
    B, Q, P = len(sizes), 4, 10
    outputs, targets = make_batch(B, Q, K, sizes, (5, 6), (20, 24))
    outputs["aux_outputs"] = [make_batch(B, Q, K, sizes, (5, 6), (20, 24), seed=s)[0] for s in (1, 2)]
    calls = []

    def importance(logits, num_points, oversample_ratio, importance_sample_ratio, generator=None):
        calls.append((logits.detach().clone(), num_points, oversample_ratio, importance_sample_ratio))
        return fixed_points(logits.shape[0], num_points, seed=100 + len(calls))
    monkeypatch.setattr(criterion_module, "uncertain_point_coords", importance)
    crit = point_criterion(P, oversample_ratio=2.0, importance_sample_ratio=0.5)
    losses = crit(outputs, targets)
    layers = [outputs] + outputs["aux_outputs"]
    assert set(losses) == {f"{k}{s}" for k in WEIGHTS for s in ("", "_0", "_1")}
    fixed_matcher_points.clear()
    matches = crit.matcher.match_layers(layers, targets)  # the same fixed points: the same matching
    num_masks = max(sum(sizes), 1)
    assert len(calls) == 3
    for layer, (out, indices, call) in enumerate(zip(layers, matches, calls)):
        suffix = "" if layer == 0 else f"_{layer - 1}"
        pairs = [(b, q, j) for b, (rows, cols) in enumerate(indices) for q, j in zip(rows.tolist(), cols.tolist())]
        preds = np.array([out["pred_masks"][b, q].double().numpy() for b, q, _ in pairs]).reshape(-1, 5, 6)
        masks = np.array([targets[b]["masks"][j].double().numpy() for b, _, j in pairs]).reshape(-1, 20, 24)
        # The criterion asks for importance-sampled points of exactly the matched logits, in this order.
        assert torch.equal(call[0][:, 0], torch.from_numpy(preds).float()) and call[1:] == (P, 2.0, 0.5)
        coords = fixed_points(len(pairs), P, seed=101 + layer).double().numpy()
        x = np.array([ind.sample_masks(p[None], c)[0] for p, c in zip(preds, coords)]).reshape(-1, P)
        t = np.array([ind.sample_masks(m[None], c)[0] for m, c in zip(masks, coords)]).reshape(-1, P)
        e_mask, e_dice = ind.point_losses(x, t, num_masks)
        ce = expected_losses(out, targets, indices, K, 0.1, num_masks)[0]
        assert_close(losses["loss_mask" + suffix], torch.tensor(e_mask), what="loss_mask" + suffix)
        assert_close(losses["loss_dice" + suffix], torch.tensor(e_dice), what="loss_dice" + suffix)
        assert_close(losses["loss_ce" + suffix], torch.tensor(ce), what="loss_ce" + suffix)


def test_gradients_reach_logits_and_matched_masks_only():
    outputs, targets = make_batch(2, 5, K, [2, 1], (6, 6), (24, 24))
    for v in outputs.values():
        v.requires_grad_(True)
    crit = point_criterion(32, seed=0)
    losses = crit(outputs, targets)
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum(-1).gt(0).all()  # every query gets a class gradient
    crit.matcher.generator.manual_seed(0)
    matched = {(b, q) for b, (rows, _) in enumerate(crit.matcher(outputs, targets)) for q in rows.tolist()}
    per_query = outputs["pred_masks"].grad.abs().flatten(2).sum(-1)
    for b in range(2):
        for q in range(5):
            assert (per_query[b, q] > 0) == ((b, q) in matched), (b, q)


def _stacked_layers(L, B, Q, sizes, hw, HW, layout):
    """L layers' outputs whose mask logits are the unbound slices of one leaf (``layout`` "LBQ": a
    contiguous [L, B, Q, h, w]; "BLQ": [B, L Q, h w] seen as [L, B, Q, h, w], the layout of this
    package's heads), and the same values as L separate leaves."""
    layers = [make_batch(B, Q, K, sizes, hw, HW, seed=s)[0] for s in range(L)]
    targets = make_batch(B, Q, K, sizes, hw, HW)[1]
    masks = torch.stack([o["pred_masks"] for o in layers])  # [L, B, Q, h, w]
    if layout == "BLQ":
        leaf = masks.permute(1, 0, 2, 3, 4).reshape(B, L * Q, *hw).clone().requires_grad_()
        views = leaf.view(B, L, Q, *hw).permute(1, 0, 2, 3, 4).unbind(0)
    else:
        leaf = masks.clone().requires_grad_()
        views = leaf.unbind(0)
    separate = [o["pred_masks"].clone().requires_grad_() for o in layers]
    def outputs(mask_list):
        outs = [{"pred_logits": o["pred_logits"], "pred_masks": m} for o, m in zip(layers, mask_list)]
        return {**outs[0], "aux_outputs": outs[1:]}
    return outputs(views), leaf, outputs(separate), separate, targets


@pytest.mark.parametrize("layout", ["LBQ", "BLQ"])
@pytest.mark.parametrize("sizes", [[2, 3], [0, 4]], ids=str)
def test_fused_loss_of_layers_sliced_from_one_tensor_is_one_call(monkeypatch, layout, sizes):
    """Layers whose mask logits are slices of one tensor go through one point_mask_loss call (one
    group per layer, the points drawn in the same order): the losses are those of the per-layer
    calls on separate tensors, and so is every layer's gradient."""
    L, B, Q = 3, len(sizes), 5
    stacked, leaf, separate, leaves, targets = _stacked_layers(L, B, Q, sizes, (6, 7), (24, 28), layout)
    calls = []
    op = ops.point_mask_loss
    monkeypatch.setattr(ops, "point_mask_loss", lambda *a, **k: calls.append(k.get("groups")) or op(*a, **k))
    losses = point_criterion(16, fused=True, seed=3)(stacked, targets)
    assert calls == [[n for _ in range(L) for n in [sum(sizes)]]]
    calls.clear()
    expected = point_criterion(16, fused=True, seed=3)(separate, targets)
    assert len(calls) == L and calls == [None] * L
    assert losses.keys() == expected.keys()
    for k in expected:
        assert_close(losses[k], expected[k], what=k)
    sum(losses.values()).backward()
    sum(expected.values()).backward()
    grads = leaf.grad.view(B, L, Q, 6, 7).permute(1, 0, 2, 3, 4) if layout == "BLQ" else leaf.grad
    for i, sep in enumerate(leaves):
        assert_close(grads[i], sep.grad, what=f"layer {i} gradient", grad=True)


@pytest.mark.parametrize("layout", ["LBQ", "BLQ"])
def test_gradient_buffer_zeroed_during_the_draws(monkeypatch, layout):
    """On the CPU the fused one-call loss zeroes its gradient buffer on a second thread while the
    points are drawn (only for large buffers, so the threshold is lowered here): losses and gradient
    are the same bits as when the backward allocates its own, and the leaf's gradient is that buffer."""
    from fastmaskformer import criterion as crit_mod
    L, B, Q, sizes = 3, 2, 5, [2, 3]
    stacked, leaf, *_rest, targets = _stacked_layers(L, B, Q, sizes, (6, 7), (24, 28), layout)
    buffers = []
    op = ops.point_mask_loss
    monkeypatch.setattr(ops, "point_mask_loss", lambda *a, **k: buffers.append(k.get("grad_out")) or op(*a, **k))
    losses = point_criterion(16, fused=True, seed=3)(stacked, targets)
    assert buffers == [None]  # a small buffer: no thread
    sum(losses.values()).backward()
    expected = leaf.grad.clone()
    leaf.grad = None
    buffers.clear()
    monkeypatch.setattr(crit_mod, "_ZERO_AHEAD_MIN_BYTES", 0)
    again = point_criterion(16, fused=True, seed=3)(stacked, targets)
    (buffer,) = buffers
    assert buffer is not None and buffer.shape == (B * L * Q, 6, 7)
    for k in losses:
        assert torch.equal(again[k], losses[k]), k
    sum(again.values()).backward()
    assert torch.equal(leaf.grad, expected)
    assert leaf.grad.data_ptr() == buffer.data_ptr()


def test_zeroing_thread_failure_is_raised():
    """A zeroing thread that fails makes the criterion raise instead of using an unzeroed buffer."""
    from fastmaskformer.criterion import _Zeroing

    class Broken:
        def zero_(self):
            raise OSError("no memory")

    z = _Zeroing(Broken())
    with pytest.raises(RuntimeError, match="zeroing the point loss's gradient buffer failed"):
        z.join()
    t = torch.ones(1000)
    _Zeroing(t).join()
    assert torch.count_nonzero(t) == 0


def test_which_layers_are_rows_of_one_tensor():
    """Any slices whose [h, w] maps are whole rows of one contiguous tensor are (every other query
    too: a row step of 2); maps of two tensors, transposed maps, every other column, or a tensor that
    does not split into whole [h, w] rows are not."""
    masks = torch.randn(2, 1, 8, 4, 5)
    flat, layout = criterion_module._rows_of_one_tensor(list(masks[:, :, :4].unbind(0)))
    assert flat.shape == (16, 4, 5) and layout == [(0, 8, 1), (8, 8, 1)]
    assert criterion_module._rows_of_one_tensor(list(masks[:, :, 1::2].unbind(0)))[1] == [(1, 8, 2), (9, 8, 2)]
    odd = torch.randn(2 * 8 * 4 * 5 + 3)[:320].view(2, 1, 8, 4, 5)  # a base that is not whole rows
    for views in ([masks[0], torch.randn(1, 8, 4, 5)], masks.transpose(-1, -2).unbind(0), masks[..., ::2].unbind(0),
                  [torch.randn(1, 8, 4, 5)], odd.unbind(0), [masks[0], masks[1, 0]]):
        assert criterion_module._rows_of_one_tensor(list(views)) is None


@pytest.mark.parametrize("sizes", [[0, 0], [0, 2]])
def test_empty_targets(sizes):
    outputs, targets = make_batch(2, 4, K, sizes, (4, 4), (16, 16))
    for v in outputs.values():
        v.requires_grad_(True)
    losses = point_criterion(16)(outputs, targets)
    if not sum(sizes):
        assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
        assert outputs["pred_masks"].grad is None or outputs["pred_masks"].grad.abs().sum() == 0
    else:
        assert losses["loss_mask"].item() > 0 and losses["loss_dice"].item() > 0
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_reproducible_with_a_generator_and_with_the_global_rng():
    outputs, targets = make_batch(2, 5, K, [3, 2], (6, 6), (24, 24))
    a, b, c = (point_criterion(16, seed=s)(outputs, targets) for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["loss_mask"] != c["loss_mask"]
    crit = point_criterion(16)
    torch.manual_seed(3)
    d = crit(outputs, targets)
    torch.manual_seed(3)
    e = crit(outputs, targets)
    assert all(torch.equal(d[k], e[k]) for k in d)


def test_num_points_zero_is_maskformers_full_resolution_loss():
    outputs, targets = make_batch(2, 4, K, [2, 3], (4, 4), (16, 16))
    outputs["aux_outputs"] = [make_batch(2, 4, K, [2, 3], (4, 4), (16, 16), seed=1)[0]]
    crit = SetCriterion(K, HungarianMatcher(1, 20, 1), {}, 0.1)
    assert crit.num_points == 0 and crit.matcher.num_points == 0
    rng = torch.get_rng_state()
    losses = crit(outputs, targets)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    for layer, suffix in ((outputs, ""), (outputs["aux_outputs"][0], "_0")):
        indices = crit.matcher(layer, targets)
        cost, _ = ops.matching_cost(layer["pred_logits"], layer["pred_masks"], [t["labels"] for t in targets],
                                    [t["masks"] for t in targets], 1.0, 20.0, 1.0)
        for b, (rows, cols) in enumerate(indices):
            n = len(targets[b]["labels"])
            assert np.isclose(cost[b][rows, cols].sum().item(), brute_force_min(cost[b, :, :n].double().numpy()))
        pred = torch.cat([layer["pred_masks"][b, r] for b, (r, _) in enumerate(indices)])
        tgt = torch.cat([targets[b]["masks"][c] for b, (_, c) in enumerate(indices)])
        lm, ld = ops.mask_loss(pred, tgt, 5.0, 0.25, 2.0)
        assert torch.equal(losses["loss_mask" + suffix], lm) and torch.equal(losses["loss_dice" + suffix], ld)


def test_fused_step_waits_for_the_host_a_fixed_number_of_times():
    def reads(B, L):
        outputs, targets = make_batch(B, 6, K, [2] * (B - 1) + [0], (8, 8), (32, 32))
        outputs["aux_outputs"] = [make_batch(B, 6, K, [2] * B, (8, 8), (32, 32), seed=s)[0] for s in range(1, L)]
        crit = point_criterion(16, fused=True)
        crit(outputs, targets)  # chooses and caches the backends
        with HostReads() as mode:
            crit(outputs, targets)
        return mode.calls
    first = reads(2, 2)
    assert reads(6, 5) == first and len(first) <= 4, first


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_points=-1), r"num_points: expected an int >= 0 \(0: full-resolution masks\), got -1"),
    (dict(num_points=1.5), "num_points: expected an int >= 0.*got 1.5"),
    (dict(num_points=True), "num_points: expected an int >= 0.*got True"),
    (dict(oversample_ratio=0.5), "oversample_ratio: expected a number >= 1, got 0.5"),
    (dict(oversample_ratio=float("nan")), "oversample_ratio: expected a finite number"),
    (dict(importance_sample_ratio=1.5), r"importance_sample_ratio: expected a fraction in \[0, 1\], got 1.5"),
    (dict(importance_sample_ratio=-0.1), r"importance_sample_ratio: expected a fraction in \[0, 1\], got -0.1"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SetCriterion(K, HungarianMatcher(2, 5, 5), WEIGHTS, 0.1, **kwargs)
    if "num_points" in kwargs:
        with pytest.raises(ValueError, match=match):
            HungarianMatcher(2, 5, 5, num_points=kwargs["num_points"])


def test_bad_inputs_raise_clear_errors():
    outputs, targets = make_batch(2, 3, K, [2, 1], (4, 4), (8, 8))
    labels, masks = [t["labels"] for t in targets], [t["masks"] for t in targets]
    with pytest.raises(ValueError, match=r"coords: expected \[B, P, 2\] with B = 2"):
        ops.point_matching_cost(outputs["pred_logits"], outputs["pred_masks"], labels, masks, torch.rand(3, 5, 2))
    with pytest.raises(TypeError, match="coords: expected dtype"):
        ops.point_matching_cost(outputs["pred_logits"], outputs["pred_masks"], labels, masks,
                                torch.zeros(2, 5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"coords: expected \[N, P, 2\] with N = 2"):
        ops.point_mask_loss(torch.randn(2, 4, 4), torch.zeros(2, 8, 8, dtype=torch.bool), torch.rand(2, 0, 2), 1.0)
    with pytest.raises(ValueError, match="target_masks: expected 2 masks"):
        ops.point_mask_loss(torch.randn(2, 4, 4), torch.zeros(3, 8, 8, dtype=torch.bool), torch.rand(2, 5, 2), 1.0)
    with pytest.raises(ValueError, match="num_masks: expected > 0"):
        ops.point_mask_loss(torch.randn(2, 4, 4), torch.zeros(2, 8, 8, dtype=torch.bool), torch.rand(2, 5, 2), 0)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None, got int"):
        HungarianMatcher(2, 5, 5, num_points=4, generator=1)(outputs, targets)
    meta = {k: v.to("meta") for k, v in outputs.items()}
    with pytest.raises(ValueError, match=r"generator: expected a generator on the predictions' device \(meta\)"):
        HungarianMatcher(2, 5, 5, num_points=4, generator=torch.Generator())(
            meta, [{k: v.to("meta") for k, v in t.items()} for t in targets])


# ------------------------------------------------------------------------------------------- model
def test_tiny_mask2former_learns():
    torch.manual_seed(0)
    model = Mask2Former(3, backbone="resnet18", num_queries=6, hidden_dim=64, mask_dim=32, conv_dim=64, nheads=4,
                        dim_feedforward=64, dec_layers=2, enc_layers=1, enc_nheads=4, enc_n_points=2,
                        enc_dim_feedforward=64, num_points=256)
    assert model.matcher.num_points == model.criterion.num_points == 256
    assert (model.criterion.oversample_ratio, model.criterion.importance_sample_ratio) == (3.0, 0.75)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 0.2
    targets = []
    for i, (y0, x0) in enumerate(((8, 8), (24, 30))):  # a bright square of class 1 + i on class 0
        square = torch.zeros(64, 64, dtype=torch.bool)
        square[y0:y0 + 28, x0:x0 + 28] = True
        images[i, i, square] = 1.0
        targets.append({"labels": torch.tensor([0, 1 + i]), "masks": torch.stack([~square, square])})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run faster on one thread, and far faster on a busy machine
    try:
        for _ in range(30):
            loss = sum(model.loss(model(images), targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert np.isfinite(history).all() and last < 0.6 * first, history
