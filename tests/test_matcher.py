"""The reference matcher against an independent cost and brute-force optimal assignments."""
import itertools

import numpy as np
import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.matcher import HungarianMatcher

import independent


def make_batch(B, Q, K, sizes, hw, HW, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(B, Q, K + 1, generator=g) * 2,
               "pred_masks": torch.randn(B, Q, *hw, generator=g) * 3}
    targets = [{"labels": torch.randint(0, K, (n,), generator=g),
                "masks": torch.rand(n, *HW, generator=g) > 0.5} for n in sizes]
    outputs = {k: v.to(device) for k, v in outputs.items()}
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return outputs, targets


def brute_force_min(C):
    Q, N = C.shape
    if Q >= N:
        return min(sum(C[p[j], j] for j in range(N)) for p in itertools.permutations(range(Q), N))
    return min(sum(C[i, p[i]] for i in range(Q)) for p in itertools.permutations(range(N), Q))


@pytest.mark.parametrize("Q,sizes,hw,HW", [
    (5, [3, 0, 5], (4, 5), (16, 20)),      # predictions at 1/4 of the target size, an empty image
    (3, [4, 1], (5, 7), (11, 13)),         # Q < N, non-integer scale
    (4, [4], (6, 6), (6, 6)),              # same size
])
def test_matcher_is_optimal_against_independent_cost(Q, sizes, hw, HW):
    K = 6
    outputs, targets = make_batch(len(sizes), Q, K, sizes, hw, HW)
    matcher = HungarianMatcher(cost_class=1, cost_mask=20, cost_dice=1)
    indices = matcher(outputs, targets)
    cost, _ = ops.matching_cost(outputs["pred_logits"], outputs["pred_masks"], [t["labels"] for t in targets],
                                [t["masks"] for t in targets], 1.0, 20.0, 1.0)
    for b, ((rows, cols), n) in enumerate(zip(indices, sizes)):
        C = independent.matching_cost(outputs["pred_logits"][b].double().numpy(), outputs["pred_masks"][b].double().numpy(),
                                      targets[b]["labels"].numpy(), targets[b]["masks"].numpy(), 1.0, 20.0, 1.0)
        np.testing.assert_allclose(cost[b, :, :n].numpy(), C, rtol=1e-4, atol=1e-5)
        assert len(rows) == min(Q, n) and rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert torch.equal(rows, rows.sort().values)
        assert len(set(cols.tolist())) == len(cols)
        if n:
            np.testing.assert_allclose(C[rows.numpy(), cols.numpy()].sum(), brute_force_min(C), rtol=1e-9)


def test_padding_is_inf_and_sizes():
    outputs, targets = make_batch(3, 4, 3, [2, 0, 3], (4, 4), (8, 8))
    cost, sizes = ops.matching_cost(outputs["pred_logits"], outputs["pred_masks"], [t["labels"] for t in targets],
                                    [t["masks"] for t in targets])
    assert cost.shape == (3, 4, 3) and cost.dtype == torch.float32
    assert sizes.tolist() == [2, 0, 3]
    assert torch.isinf(cost[0, :, 2:]).all() and torch.isinf(cost[1]).all() and torch.isfinite(cost[2]).all()


def test_match_layers_equals_per_layer_calls():
    outputs, targets = make_batch(2, 5, 4, [3, 2], (4, 4), (16, 16))
    other, _ = make_batch(2, 5, 4, [3, 2], (4, 4), (16, 16), seed=1)
    matcher = HungarianMatcher(1, 20, 1)
    both = matcher.match_layers([outputs, other], targets)
    for got, out in zip(both, (outputs, other)):
        for (r1, c1), (r2, c2) in zip(got, matcher(out, targets)):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_cost_names_the_image_and_layer(bad, fused):
    outputs, targets = make_batch(3, 4, 3, [2, 2, 2], (4, 4), (8, 8))
    aux = make_batch(3, 4, 3, [2, 2, 2], (4, 4), (8, 8), seed=1)[0]
    aux["pred_masks"][2, 1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"image 2 \(decoder output 1\) contains NaN or Inf"):
        HungarianMatcher(1, 20, 1, fused=fused).match_layers([outputs, aux], targets)
    outputs["pred_logits"][2, 1, 0] = bad
    with pytest.raises(ValueError, match="image 2 contains NaN or Inf"):
        HungarianMatcher(1, 20, 1, fused=fused)(outputs, targets)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("label", [3, -1])
def test_label_out_of_range_is_named(label, fused):
    outputs, targets = make_batch(2, 4, 3, [2, 1], (4, 4), (8, 8))
    targets[1]["labels"] = torch.tensor([label])
    with pytest.raises(ValueError, match=r"tgt_labels\[1\]: labels must lie in \[0, 3\)"):
        HungarianMatcher(1, 20, 1, fused=fused)(outputs, targets)


def test_bad_inputs_raise_clear_errors():
    outputs, targets = make_batch(2, 4, 3, [2, 1], (4, 4), (8, 8))
    m = HungarianMatcher(1, 20, 1)
    with pytest.raises(KeyError, match="masks"):
        m(outputs, [{"labels": t["labels"]} for t in targets])
    with pytest.raises(KeyError, match="pred_masks"):
        m({"pred_logits": outputs["pred_logits"]}, targets)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        m(outputs, [{"labels": torch.tensor([0, 3]), "masks": targets[0]["masks"]}, targets[1]])
    with pytest.raises(ValueError, match="expected 2 images"):
        m(outputs, targets[:1])
    with pytest.raises(ValueError, match="padded to the batch size"):
        m(outputs, [targets[0], {"labels": targets[1]["labels"], "masks": torch.zeros(1, 9, 8, dtype=torch.bool)}])
    with pytest.raises(TypeError, match=r"tgt_masks\[0\]: expected dtype"):
        m(outputs, [{"labels": targets[0]["labels"], "masks": targets[0]["masks"].long()}, targets[1]])
    with pytest.raises(ValueError, match="meta"):
        m(outputs, [{"labels": targets[0]["labels"], "masks": targets[0]["masks"].to("meta")}, targets[1]])
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0)
