"""Post-processing against hand-checked cases and independent NumPy loops."""
import math

import numpy as np
import pytest
import torch

from fastmaskformer.inference import instance_inference, panoptic_inference, semantic_inference

import independent
from tolerances import assert_close

BIG = 10.0  # a logit whose softmax / sigmoid is as good as certain


def softmax_np(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def confident_logits(labels, K, margin=BIG):
    """[Q, K+1] logits whose argmax is ``labels[q]`` (K = no object) with probability e^m / (e^m + K)."""
    logits = torch.zeros(len(labels), K + 1)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = margin
    return logits


def box_masks(boxes, H, W):
    """[Q, H, W] logits: +BIG inside each (y0, y1, x0, x1) box, -BIG outside."""
    masks = torch.full((len(boxes), H, W), -BIG)
    for q, (y0, y1, x0, x1) in enumerate(boxes):
        masks[q, y0:y1, x0:x1] = BIG
    return masks


def confident_prob(K, margin=BIG):
    return math.exp(margin) / (math.exp(margin) + K)


# ---------------------------------------------------------------------------------------- semantic
@pytest.mark.parametrize("output_size", [None, (7, 9)])
def test_semantic_matches_independent_loops(output_size):
    logits, masks = torch.randn(3, 5), torch.randn(3, 4, 5)
    out = semantic_inference(logits, masks, output_size)
    prob = softmax_np(logits.double().numpy())[:, :-1]
    size = masks.shape[-2:] if output_size is None else output_size
    sig = np.stack([independent.sigmoid(independent.bilinear_resize(m, size)) for m in masks.double().numpy()])
    expected = np.einsum("qk,qhw->khw", prob, sig)
    assert out.shape == (4, *size)
    assert_close(out, torch.from_numpy(expected), what="semantic scores")


def test_semantic_batch_is_one_op_call_matching_independent_loops(monkeypatch):
    """[B, Q, K+1], [B, Q, h, w] -> [B, K, H, W], each image as the independent per-image formula, in
    a single call of the op (the batched predict() relies on it)."""
    from fastmaskformer import ops
    calls = []
    original = ops.semantic_inference
    monkeypatch.setattr(ops, "semantic_inference", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    logits, masks = torch.randn(2, 3, 5), torch.randn(2, 3, 4, 5)
    out = semantic_inference(logits, masks, (7, 9))
    assert calls == [(2, 3, 5)] and out.shape == (2, 4, 7, 9)
    for b in range(2):
        prob = softmax_np(logits[b].double().numpy())[:, :-1]
        sig = np.stack([independent.sigmoid(independent.bilinear_resize(m, (7, 9))) for m in masks[b].double().numpy()])
        assert_close(out[b], torch.from_numpy(np.einsum("qk,qhw->khw", prob, sig)), what=f"semantic scores of image {b}")
    with pytest.raises(ValueError, match="pred_masks: expected a 4-d"):
        semantic_inference(logits, masks[0])
    with pytest.raises(ValueError, match="pred_masks: expected \\[B, Q\\] = \\(2, 3\\) masks"):
        semantic_inference(logits, masks[:, :2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semantic_fused_and_low_precision_agree_with_reference(dtype):
    logits, masks = torch.randn(4, 6), torch.randn(4, 5, 3)
    ref = semantic_inference(logits, masks, (11, 6))
    assert_close(semantic_inference(logits, masks, (11, 6), fused=True), ref, what="fused semantic")
    low = semantic_inference(logits.to(dtype), masks.to(dtype), (11, 6))
    assert_close(low, semantic_inference(logits.to(dtype).float(), masks.to(dtype).float(), (11, 6)), dtype,
                 what="low-precision semantic")


# ---------------------------------------------------------------------------------------- panoptic
def test_panoptic_two_queries_known_segments():
    K, things = 3, {0}
    # q0: thing 0, left half; q1: stuff 1, right half; q2: no object; q3: thing 0 below the threshold.
    logits = confident_logits([0, 1, K, 0], K)
    logits[3] = torch.tensor([0.5, 0.0, 0.0, 0.0])
    masks = box_masks([(0, 4, 0, 2), (0, 4, 2, 4), (0, 4, 0, 4), (0, 4, 0, 4)], 4, 4)
    seg, info = panoptic_inference(logits, masks, 0.8, 0.8, things)
    expected = torch.tensor([[1, 1, 2, 2]] * 4, dtype=torch.int32)
    assert seg.dtype == torch.int32 and torch.equal(seg, expected)
    p = confident_prob(K)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, True), (2, 1, False)]
    assert [s["score"] for s in info] == pytest.approx([p, p], rel=1e-6)


@pytest.mark.parametrize("overlap_threshold, kept", [(0.8, False), (0.3, True)])
def test_panoptic_overlap_threshold_drops_occluded_query(overlap_threshold, kept):
    K = 3
    # q0 (score higher) covers columns 0..2, q1 (lower score) columns 1..3: q1 wins column 3 only,
    # 4 of its 12 pixels (1/3).
    logits = confident_logits([0, 2], K)
    logits[1, 2] = BIG - 1
    masks = box_masks([(0, 4, 0, 3), (0, 4, 1, 4)], 4, 4)
    seg, info = panoptic_inference(logits, masks, 0.8, overlap_threshold)
    col3 = 2 if kept else 0
    assert torch.equal(seg, torch.tensor([[1, 1, 1, col3]] * 4, dtype=torch.int32))
    assert [s["category_id"] for s in info] == ([0, 2] if kept else [0])
    if kept:
        assert info[1]["score"] == pytest.approx(math.exp(BIG - 1) / (math.exp(BIG - 1) + K), rel=1e-6)


def test_panoptic_merges_stuff_but_not_things():
    K, things = 3, {0}
    # q0, q2: stuff 1 (top-left, bottom-right); q1, q3: thing 0 (top-right, bottom-left).
    logits = confident_logits([1, 0, 1, 0], K)
    logits[2, 1] = BIG - 0.5  # the merged segment keeps the FIRST query's score
    masks = box_masks([(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 2, 4), (2, 4, 0, 2)], 4, 4)
    seg, info = panoptic_inference(logits, masks, 0.8, 0.8, things)
    assert torch.equal(seg, torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 1, 1], [3, 3, 1, 1]], dtype=torch.int32))
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 1, False), (2, 0, True), (3, 0, True)]
    assert info[0]["score"] == pytest.approx(confident_prob(K), rel=1e-6)
    # Without thing_classes every class is a thing: four segments.
    seg_all, info_all = panoptic_inference(logits, masks, 0.8, 0.8)
    assert [s["id"] for s in info_all] == [1, 2, 3, 4] and all(s["isthing"] for s in info_all)
    assert torch.equal(seg_all, torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [4, 4, 3, 3], [4, 4, 3, 3]],
                                             dtype=torch.int32))


def test_panoptic_query_without_own_mask_leaves_void():
    # q1 wins the right half by score * sigmoid but its own mask (sigmoid >= 0.5) is empty: no
    # segment, and its pixels stay 0, as in the official code.
    K = 2
    logits = confident_logits([0, 1], K)
    masks = box_masks([(0, 3, 0, 2), (0, 3, 0, 0)], 3, 4)
    masks[1] = -0.1
    seg, info = panoptic_inference(logits, masks)
    assert torch.equal(seg, torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.int32))
    assert [s["category_id"] for s in info] == [0]


def test_panoptic_nothing_detected():
    K = 4
    seg, info = panoptic_inference(confident_logits([K, K], K), torch.randn(2, 5, 3))
    assert info == [] and seg.shape == (5, 3) and seg.dtype == torch.int32 and not seg.any()
    seg, info = panoptic_inference(torch.zeros(0, K + 1), torch.zeros(0, 5, 3))
    assert info == [] and seg.shape == (5, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_panoptic_low_precision_and_non_contiguous(dtype):
    K = 3
    logits = confident_logits([0, 1], K)
    masks = box_masks([(0, 4, 0, 2), (0, 4, 2, 5)], 4, 5)
    seg, info = panoptic_inference(logits, masks, thing_classes=[0])
    seg_low, info_low = panoptic_inference(logits.to(dtype), masks.to(dtype), thing_classes=[0])
    assert torch.equal(seg_low, seg) and [s["id"] for s in info_low] == [s["id"] for s in info]
    seg_t, _ = panoptic_inference(logits.t().contiguous().t(), masks.transpose(1, 2).contiguous().transpose(1, 2),
                                  thing_classes=[0])
    assert torch.equal(seg_t, seg)


# ---------------------------------------------------------------------------------------- instance
def expected_instances(logits, masks, topk, things=None):
    """Brute force: rank every (query, class) by probability, keep topk, score with the mask."""
    prob = softmax_np(logits.double().numpy())[:, :-1]
    m = masks.double().numpy()
    Q, K = prob.shape
    pairs = sorted(((prob[q, k], q, k) for q in range(Q) for k in range(K)), reverse=True)[:topk]
    out = []
    for p, q, k in pairs:
        if things is not None and k not in things:
            continue
        binary = m[q] > 0
        mean_inside = (independent.sigmoid(m[q]) * binary).sum() / (binary.sum() + 1e-6)
        out.append((p * mean_inside, k, binary))
    return out


@pytest.mark.parametrize("topk, things", [(5, None), (5, {0, 2}), (100, None)])
def test_instance_topk_order_and_scores(topk, things):
    logits, masks = torch.randn(4, 4) * 2, torch.randn(4, 5, 6)
    masks[1] = -1.0  # an empty mask scores 0
    out = instance_inference(logits, masks, topk, things)
    exp = expected_instances(logits, masks, topk, things)
    assert len(out["scores"]) == len(exp) == len(out["labels"]) == len(out["masks"])
    assert out["labels"].dtype == torch.int64 and out["masks"].dtype == torch.bool
    assert out["labels"].tolist() == [k for _, k, _ in exp]
    assert torch.equal(out["masks"], torch.from_numpy(np.stack([b for _, _, b in exp])))
    assert_close(out["scores"], torch.tensor([s for s, _, _ in exp]), what="instance scores")


def test_instance_low_precision_matches_float32():
    logits, masks = torch.randn(3, 4), torch.randn(3, 4, 4)
    ref = instance_inference(logits.half().float(), masks.half().float(), 4)
    low = instance_inference(logits.half(), masks.half(), 4)
    assert low["labels"].tolist() == ref["labels"].tolist()
    assert_close(low["scores"], ref["scores"], what="fp16 instance scores")


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn", [semantic_inference, panoptic_inference, instance_inference])
def test_bad_inputs_raise_clear_errors(fn):
    logits, masks = torch.randn(3, 4), torch.randn(3, 5, 5)
    with pytest.raises(ValueError, match="pred_logits: expected a 2-d"):
        fn(logits[None, None], masks)
    with pytest.raises(TypeError, match="pred_masks: expected dtype"):
        fn(logits, masks > 0)
    with pytest.raises(ValueError, match="pred_masks: expected 3 masks"):
        fn(logits, masks[:2])
    with pytest.raises(ValueError, match="K\\+1"):
        fn(logits[:, :1], masks)
    with pytest.raises(ValueError, match="meta"):
        fn(logits, masks.to("meta"))


def test_bad_parameters():
    logits, masks = torch.randn(3, 4), torch.randn(3, 5, 5)
    with pytest.raises(ValueError, match="topk"):
        instance_inference(logits, masks, topk=0)
    with pytest.raises(ValueError, match="overlap_threshold"):
        panoptic_inference(logits, masks, overlap_threshold=float("nan"))
