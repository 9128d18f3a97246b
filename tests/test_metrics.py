"""Semantic and panoptic metrics against small cases worked out by hand (the expected numbers in the
comments are computed from the definitions, not from the code)."""
import math

import pytest
import torch

from fastmaskformer.evaluation import PanopticEvaluator, SemSegEvaluator

# 3 classes, one ignored pixel (255) on which the prediction (2) must not count.
SEM_GT = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 1]])
SEM_PRED = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 0]])
# class 0: tp 1, gt 2, pred 3 -> IoU 1/4, acc 1/2; class 1: tp 3, gt 4, pred 4 -> IoU 3/5, acc 3/4;
# class 2: tp 0, gt 1, pred 0 -> IoU 0, acc 0. 7 valid pixels, 4 correct.
SEM_EXPECTED = {"mIoU": 100 * (0.25 + 0.6 + 0) / 3, "fwIoU": 100 * (2 * 0.25 + 4 * 0.6) / 7,
                "pixel_acc": 100 * 4 / 7, "mean_acc": 100 * (0.5 + 0.75 + 0) / 3}


def _check(metrics, expected):
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, abs=1e-9), k


def test_semseg_hand_case():
    ev = SemSegEvaluator(3, class_names=["a", "b", "c"])
    ev.process(SEM_PRED, SEM_GT)
    m = ev.evaluate()
    _check(m, SEM_EXPECTED)
    assert m["per_class_iou"] == pytest.approx({"a": 25.0, "b": 60.0, "c": 0.0})


def test_semseg_batches_accumulate_and_reset():
    ev = SemSegEvaluator(3)
    ev.process(torch.zeros(2, 3, dtype=torch.int64), torch.full((2, 3), 255))  # all ignored: no effect
    ev.process(torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, 5, dtype=torch.int64))  # empty: no effect
    ev.process(SEM_PRED.T.contiguous().T[:1], SEM_GT[:1])  # row 0, a non-contiguous view
    ev.process(SEM_PRED[1:].to(torch.uint8), SEM_GT[1:].to(torch.int32))  # row 1, other int dtypes
    _check(ev.evaluate(), SEM_EXPECTED)
    ev.process(torch.stack([SEM_PRED, SEM_PRED]), torch.stack([SEM_GT, SEM_GT]))  # [B,H,W]
    _check(ev.evaluate(), SEM_EXPECTED)  # doubled counts, same ratios
    ev.reset()
    assert math.isnan(ev.evaluate()["mIoU"])


def test_semseg_class_without_gt_is_excluded():
    # Class 3 never in GT: NaN and out of the mean, but its false positive still lowers class 0
    # (pred 0 at (1,3) becomes 3): class 0 tp 1, gt 2, pred 2 -> IoU 1/3.
    pred = SEM_PRED.clone()
    pred[1, 3] = 3
    ev = SemSegEvaluator(4)
    ev.process(pred, SEM_GT)
    m = ev.evaluate()
    assert math.isnan(m["per_class_iou"]["3"])
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 0.6 + 0) / 3)


@pytest.mark.parametrize("pred,gt,match", [
    (torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "one shape"),
    (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), "pred: expected dtype"),
    (torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.long), r"pred: classes must lie in \[0, 3\)"),
    (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), "gt: labels must lie"),
    (torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long, device="meta"), "meta"),
])
def test_semseg_bad_input(pred, gt, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SemSegEvaluator(3).process(pred, gt)


def _blocks(h, w, rects):
    """An id map of zeros with rectangles (rows, cols, id) painted in order."""
    m = torch.zeros(h, w, dtype=torch.long)
    for (r0, r1), (c0, c1), v in rects:
        m[r0:r1, c0:c1] = v
    return m


# Classes: 0 person (thing), 1 car (thing), 2 sky (stuff). A 4x8 image.
GT_IDS = _blocks(4, 8, [((0, 4), (0, 2), 1), ((0, 4), (2, 4), 2), ((0, 2), (4, 8), 3), ((2, 4), (4, 6), 4)])
GT_SEGS = [dict(id=1, category_id=0, iscrowd=0), dict(id=2, category_id=1, iscrowd=0),
           dict(id=3, category_id=2, iscrowd=0), dict(id=4, category_id=0, iscrowd=1)]  # cols 6-7 rows 2-3: void
PRED_IDS = _blocks(4, 8, [((0, 4), (0, 2), 10), ((0, 2), (2, 3), 10), ((2, 4), (2, 3), 11), ((0, 4), (3, 4), 11),
                          ((0, 2), (4, 8), 12), ((2, 3), (6, 8), 12), ((2, 4), (4, 6), 13), ((3, 4), (6, 8), 14)])
PRED_SEGS = [dict(id=10, category_id=0), dict(id=11, category_id=2), dict(id=12, category_id=2),
             dict(id=13, category_id=0), dict(id=14, category_id=1), dict(id=99, category_id=1)]  # 99: no pixels
# person: pred 10 (10 px) vs gt 1 (8 px): IoU 8/10 -> TP; pred 13 lies on the person crowd -> not FP;
#   the crowd is not a FN. PQ .8 SQ .8 RQ 1.
# car: gt 2 overlapped only by other classes -> FN; pred 14 lies on void -> not FP. PQ 0 SQ 0 RQ 0.
# sky: pred 12 (10 px, 2 on void) vs gt 3 (8 px): union 10 + 8 - 8 - 2 = 8 -> IoU 1, TP;
#   pred 11 (6 px on the car) -> FP. PQ 1/1.5, SQ 1, RQ 1/1.5.
PQ_EXPECTED = {"PQ": 100 * (0.8 + 0 + 2 / 3) / 3, "SQ": 100 * (0.8 + 0 + 1) / 3, "RQ": 100 * (1 + 0 + 2 / 3) / 3,
               "PQ_th": 40.0, "SQ_th": 40.0, "RQ_th": 50.0,
               "PQ_st": 100 * 2 / 3, "SQ_st": 100.0, "RQ_st": 100 * 2 / 3}


def test_panoptic_hand_case():
    ev = PanopticEvaluator(3, thing_classes=[0, 1], class_names=["person", "car", "sky"])
    ev.process(PRED_IDS, PRED_SEGS, GT_IDS, GT_SEGS)
    m = ev.evaluate()
    _check(m, PQ_EXPECTED)
    assert m["per_class"]["person"] == pytest.approx({"PQ": 80.0, "SQ": 80.0, "RQ": 100.0})
    assert m["per_class"]["car"] == pytest.approx({"PQ": 0.0, "SQ": 0.0, "RQ": 0.0})
    assert m["per_class"]["sky"] == pytest.approx({"PQ": 200 / 3, "SQ": 100.0, "RQ": 200 / 3})
    ev.process(PRED_IDS.int(), PRED_SEGS, GT_IDS.int(), GT_SEGS)  # a second identical image: same ratios
    _check(ev.evaluate(), PQ_EXPECTED)


def test_panoptic_thresholds_are_strict():
    # IoU exactly 0.5 does not match (gt 1 split into two halves of one class: FN 1, FP 2), and a
    # prediction with exactly half its area on void is still a false positive.
    ev = PanopticEvaluator(2, thing_classes=[0])
    ev.process(torch.tensor([[5, 5, 6, 6, 7, 7]]), [dict(id=5, category_id=0), dict(id=6, category_id=0),
                                                      dict(id=7, category_id=1)],
               torch.tensor([[1, 1, 1, 1, 0, 2]]), [dict(id=1, category_id=0), dict(id=2, category_id=1)])
    # class 1: pred 7 vs gt 2: inter 1, union 2 + 1 - 1 - 1 (void) = 1 -> IoU 1: TP. class 0: PQ 0.
    m = ev.evaluate()
    assert m["per_class"]["0"] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0}
    assert m["per_class"]["1"] == {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0}
    ev.reset()
    ev.process(torch.tensor([[5, 5, 0]]), [dict(id=5, category_id=0)], torch.tensor([[0, 1, 1]]),
               [dict(id=1, category_id=1)])
    assert ev.evaluate()["per_class"]["0"]["RQ"] == 0.0  # 1 of 2 px on void: FP, class 0 seen


def test_panoptic_empty_and_groups_absent():
    ev = PanopticEvaluator(2, thing_classes=[0])
    ev.process(torch.zeros(0, 0, dtype=torch.long), [], torch.zeros(0, 0, dtype=torch.long), [])
    m = ev.evaluate()
    assert math.isnan(m["PQ"]) and m["per_class"] == {}


@pytest.mark.parametrize("args,match", [
    ((torch.tensor([[3]]), [], torch.tensor([[0]]), []), r"pred_ids: segment ids \[3\]"),
    ((torch.tensor([[3]]), [dict(id=3, category_id=5)], torch.tensor([[0]]), []), "category_id must lie"),
    ((torch.tensor([[0]]), [dict(id=0, category_id=0)], torch.tensor([[0]]), []), "reserved for void"),
    ((torch.tensor([[0]]), [], torch.tensor([[0, 0]]), []), "one shape"),
    ((torch.tensor([[0.0]]), [], torch.tensor([[0]]), []), "pred_ids: expected dtype"),
    ((torch.tensor([[0]]), [], torch.tensor([[0]], device="meta"), []), "meta"),
])
def test_panoptic_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PanopticEvaluator(2, thing_classes=[0]).process(*args)


def test_constructor_errors():
    with pytest.raises(ValueError, match="thing_classes"):
        PanopticEvaluator(2, thing_classes=[2])
    with pytest.raises(ValueError, match="class_names: expected 3 names, got 2"):
        SemSegEvaluator(3, class_names=["a", "b"])


def test_evaluators_sum_over_ranks(monkeypatch):
    """Under torch.distributed, evaluate() sums the statistics of all ranks. A stand-in all_reduce adds
    the statistics of a second evaluator ("rank 1") that saw the rest of the data; spawning real gloo
    processes would cost more CPU than this file's budget (the engine's DDP test runs gloo)."""
    import fastmaskformer.evaluation._distributed as d

    rank1_sem, rank1_pan = SemSegEvaluator(3), PanopticEvaluator(3, thing_classes=[0, 1])
    rank1_sem.process(SEM_PRED[1:], SEM_GT[1:])
    rank1_pan.process(PRED_IDS, PRED_SEGS, GT_IDS, GT_SEGS)
    others = {torch.int64: rank1_sem.conf, torch.float64: rank1_pan.stats}
    monkeypatch.setattr(d.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(d.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(d.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(d.dist, "all_reduce", lambda buf: buf.add_(others[buf.dtype]))

    sem = SemSegEvaluator(3)
    sem.process(SEM_PRED[:1], SEM_GT[:1])
    _check(sem.evaluate(), SEM_EXPECTED)
    _check(PanopticEvaluator(3, thing_classes=[0, 1]).evaluate(), PQ_EXPECTED)  # rank 0 saw no image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluators_accept_cuda_tensors():
    sem, pan = SemSegEvaluator(3), PanopticEvaluator(3, thing_classes=[0, 1])
    sem.process(SEM_PRED.cuda(), SEM_GT.cuda())
    pan.process(PRED_IDS.cuda(), PRED_SEGS, GT_IDS.cuda(), GT_SEGS)
    _check(sem.evaluate(), SEM_EXPECTED)
    _check(pan.evaluate(), PQ_EXPECTED)
