"""ops.ms_deform_attn's reference against an explicit bilinear-sampling loop (tests/independent_points.py):
odd level sizes (a 1x1 level included), points on pixel centres, on the map borders and outside them,
both forms of spatial_shapes, gradients, and argument errors."""
import numpy as np
import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.ops._ms_deform_attn import ms_deform_attn_reference

import independent_points as ind
from tolerances import assert_close

SHAPES = ((3, 5), (1, 1), (4, 2))  # odd sizes, a single-pixel level
B, M, D, LQ, P = 2, 2, 3, 5, 3


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, M, D, generator=g)
    loc = torch.rand(B, LQ, M, len(SHAPES), P, 2, generator=g) * 1.4 - 0.2  # some outside [0, 1]
    # Exact cases on every level: the borders, a corner, a pixel centre, and points beyond a border
    # by less than and more than half a pixel.
    loc[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0])
    loc[0, 0, 0, :, 1] = torch.tensor([1.0, 1.0])
    loc[0, 0, 1, :, 0] = torch.tensor([0.5, 0.0])
    loc[0, 1, 0, 0, 0] = torch.tensor([0.5 / 5, 2.5 / 3])  # the centre of pixel (2, 0) on level 0
    loc[1, 0, 0, :, 0] = torch.tensor([-0.05, 0.5])
    loc[1, 0, 1, :, 2] = torch.tensor([1.3, -0.4])
    weights = torch.rand(B, LQ, M, len(SHAPES), P, generator=g)
    starts = torch.tensor([0, 15, 16], dtype=torch.int64)
    return value, starts, loc, weights


def _expected(value, loc, weights):
    return torch.from_numpy(ind.ms_deform_attn(value.double().numpy(), SHAPES, loc.double().numpy(),
                                               weights.double().numpy()))


@pytest.mark.parametrize("shapes_as", ["tensor", "tuple"])
def test_reference_matches_bilinear_loop(shapes_as):
    value, starts, loc, weights = _inputs()
    shapes = torch.tensor(SHAPES) if shapes_as == "tensor" else SHAPES
    out = ops.ms_deform_attn(value, shapes, starts, loc, weights)
    assert out.shape == (B, LQ, M * D) and out.is_contiguous()
    assert_close(out, _expected(value, loc, weights), what="ms_deform_attn vs loop")


def test_pixel_centre_reads_the_pixel_and_far_outside_reads_zero():
    value, starts, loc, weights = _inputs()
    weights.zero_()
    weights[0, 1, 0, 0, 0] = 1.0  # only the point at the centre of pixel (2, 0) of level 0 counts
    loc[1, 0, 1, :, 2] = torch.tensor([2.0, -1.0])  # more than a pixel outside even the 1x1 level
    weights[1, 0, 1, :, 2] = 1.0  # only those points
    out = ops.ms_deform_attn(value, SHAPES, starts, loc, weights)
    assert_close(out[0, 1, :D], value[0, 2 * 5 + 0, 0], what="pixel centre")
    assert torch.equal(out[1, 0, D:], torch.zeros(D))


def test_gradients_match_the_loop():
    value, starts, loc, weights = _inputs(1)
    value.requires_grad_(True)
    weights.requires_grad_(True)
    grad_out = torch.randn(B, LQ, M * D)
    (ops.ms_deform_attn(value, SHAPES, starts, loc, weights) * grad_out).sum().backward()
    expected_value_grad = ind.ms_deform_attn_value_grad(tuple(value.shape), SHAPES, loc.double().numpy(),
                                                        weights.detach().double().numpy(), grad_out.double().numpy())
    assert_close(value.grad, torch.from_numpy(expected_value_grad), what="d value", grad=True)
    # d out / d weight[b, q, m, l, p] = the sampled value of that point, dotted with the output gradient.
    v, lc, go = value.detach().double().numpy(), loc.double().numpy(), grad_out.double().numpy().reshape(B, LQ, M, D)
    starts_np = np.cumsum([0] + [h * w for h, w in SHAPES])
    expected_w = np.zeros(tuple(weights.shape))
    for b, q, m, lvl, p in np.ndindex(*weights.shape):
        h, w = SHAPES[lvl]
        level = v[b, starts_np[lvl]:starts_np[lvl + 1], m].reshape(h, w, D)
        expected_w[b, q, m, lvl, p] = ind.bilinear_sample(level, *lc[b, q, m, lvl, p]) @ go[b, q, m]
    assert_close(weights.grad, torch.from_numpy(expected_w), what="d attention_weights", grad=True)


def test_registered_as_an_op():
    assert ops.OPS["ms_deform_attn"] is ops.ms_deform_attn
    assert ops.ms_deform_attn.reference is ms_deform_attn_reference
    assert "ms_deform_attn" in ops.__all__


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(value=a["value"][0]), ValueError, "value: expected a 4-d"),
    (lambda a: a.update(value=a["value"].double()), TypeError, "value: expected dtype"),
    (lambda a: a.update(spatial_shapes=torch.tensor(SHAPES, dtype=torch.int32)), TypeError, "spatial_shapes: expected dtype"),
    (lambda a: a.update(spatial_shapes=torch.tensor(SHAPES)[:, :1]), ValueError, "spatial_shapes: expected \\[L, 2\\]"),
    (lambda a: a.update(spatial_shapes=((3, 5), (1, 1), (4, 2.0))), TypeError, "spatial_shapes: expected an int64"),
    (lambda a: a.update(spatial_shapes="3x5"), TypeError, "spatial_shapes: expected an int64"),
    (lambda a: a.update(spatial_shapes=((3, 5), (1, 1), (4, 3))), ValueError, "value: expected S = .* = 28 rows"),
    (lambda a: a.update(spatial_shapes=((3, 5), (1, 1), (0, 2)), value=a["value"][:, :16]), ValueError, "positive sizes"),
    (lambda a: a.update(level_start_index=torch.tensor([0, 15, 17])), ValueError, "level_start_index: expected \\[0, 15, 16\\]"),
    (lambda a: a.update(level_start_index=torch.tensor([0, 15])), ValueError, "level_start_index: expected 3 entries"),
    (lambda a: a.update(level_start_index=torch.tensor([0.0, 15, 16])), TypeError, "level_start_index: expected dtype"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][..., :1]), ValueError, "sampling_locations: expected \\[B, Lq, heads, L, P, 2\\]"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][:, :, :1]), ValueError, "sampling_locations: expected"),
    (lambda a: a.update(attention_weights=a["attention_weights"][..., :2]), ValueError, "attention_weights: expected \\[B, Lq, heads, L, P\\]"),
    (lambda a: a.update(attention_weights=a["attention_weights"].half()), TypeError, "one dtype"),
    (lambda a: a.update(attention_weights=a["attention_weights"].to("meta")), ValueError, "meta"),
])
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    value, starts, loc, weights = _inputs()
    args = dict(value=value, spatial_shapes=torch.tensor(SHAPES), level_start_index=starts,
                sampling_locations=loc, attention_weights=weights)
    mutate(args)
    with pytest.raises(error, match=match):
        ops.ms_deform_attn(**args)
