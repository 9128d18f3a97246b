"""COCO instance segmentation: the reader on a fixture folder in the released format (JPEGs and an
instances JSON holding a polygon, compressed RLE and an uncompressed-RLE crowd region), and mask AP
through ``run_evaluation`` / the command line, against values worked out by hand from the COCO
definition (101 recall points, crowd regions absorbing detections, area ranges from the JSON)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from fastmaskformer.config import DataConfig, load_config
from fastmaskformer.data import DatasetError, MissingDataError, build_dataset
from fastmaskformer.data.coco_instance import COCOInstanceDataset
from fastmaskformer.engine.build import build_model
from fastmaskformer.engine.data import val_loader
from fastmaskformer.evaluate import main, run_evaluation
from fastmaskformer.evaluation import InstanceEvaluator

CATS = [dict(id=18, name="dog", supercategory="animal"), dict(id=1, name="person", supercategory="person")]
PERSON, DOG = 0, 1  # contiguous ids follow the COCO ids: 1 -> 0, 18 -> 1
SIZES = {42: (64, 80), 7: (48, 96)}


def _box(image_id, y0, y1, x0, x1):
    m = np.zeros(SIZES[image_id], dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# image 42: person A (polygon, 40x40 = 1600 px: medium), dog B (compressed RLE, 10x10: small),
# a person crowd region C (uncompressed RLE); image 7: dog D (polygon, 30x40 = 1200: medium), person E
# (compressed RLE, 12x12: small). Even bounds, so a half-size copy upsamples back exactly.
A, B, C = _box(42, 8, 48, 10, 50), _box(42, 50, 60, 60, 70), _box(42, 0, 6, 60, 80)
D, E = _box(7, 10, 40, 40, 80), _box(7, 30, 42, 6, 18)


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def _compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ann(id, image_id, category_id, segmentation, mask, iscrowd=0):
    return dict(id=id, image_id=image_id, category_id=category_id, segmentation=segmentation, iscrowd=iscrowd,
                area=int(mask.sum()), bbox=[0, 0, 1, 1])


ANNS = [
    _ann(1, 42, 1, [[10, 8, 50, 8, 50, 48, 10, 48]], A),
    _ann(2, 42, 18, _compressed_rle(B), B),
    _ann(3, 42, 1, _uncompressed_rle(C), C, iscrowd=1),
    _ann(4, 7, 18, [[40, 10, 80, 10, 80, 40, 40, 40]], D),
    _ann(5, 7, 1, _compressed_rle(E), E),
]


@pytest.fixture
def coco_root(tmp_path):
    images = [dict(id=i, file_name=f"{i:012d}.jpg", height=h, width=w) for i, (h, w) in SIZES.items()]
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        for i, (h, w) in SIZES.items():
            Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(tmp_path / split / f"{i:012d}.jpg", quality=95)
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(dict(images=images, annotations=ANNS, categories=CATS)))
    return tmp_path


def test_reader_decodes_polygons_rle_and_crowd(coco_root):
    ds = COCOInstanceDataset(str(coco_root), "val")
    assert (ds.num_classes, ds.class_names, ds.category_ids, ds.thing_classes) == (2, ["person", "dog"], [1, 18],
                                                                                  [0, 1])
    assert len(ds) == 2 and ds.records == [7, 42]
    s = ds[1]
    assert s["image_id"] == 42 and s["orig_size"] == (64, 80) and s["image"].shape == (3, 64, 80)
    assert s["inst_masks"].dtype == torch.bool
    for got, expected in zip(s["inst_masks"], (A, B, C)):
        assert torch.equal(got, torch.from_numpy(expected))
    assert s["inst_labels"].tolist() == [PERSON, DOG, PERSON] and s["inst_iscrowd"].tolist() == [False, False, True]
    # training targets: the non-crowd instances; sem_seg paints them, crowd and background are ignored
    assert s["labels"].tolist() == [PERSON, DOG]
    assert torch.equal(s["masks"], torch.from_numpy(np.stack([A, B])))
    expected_sem = np.full(SIZES[42], 255)
    expected_sem[A], expected_sem[B] = PERSON, DOG
    assert torch.equal(s["sem_seg"], torch.from_numpy(expected_sem))


def test_instance_masks_move_with_the_augmentation(coco_root):
    cfg = DataConfig(name="coco_instance", root=str(coco_root), num_classes=2, crop_size=(32, 32), min_scale=1.0,
                     max_scale=1.0, base_size=48, max_single_class_ratio=1.0, color_jitter=False)
    torch.manual_seed(3)
    s = build_dataset(cfg, "train")[0]  # image 7 (48x96) stays at scale 1; a random 32x32 crop
    assert s["image"].shape == (3, 32, 32) and s["inst_masks"].shape == (2, 32, 32)
    sem = s["sem_seg"]
    for label, m in zip(s["labels"].tolist(), s["masks"]):
        assert m.any() and bool((sem[m] == label).all())  # each mask sits where sem_seg has its class
    assert int(s["masks"].sum()) == int((sem != 255).sum())  # no overlaps in image 7: they tile sem_seg


def test_reader_errors(coco_root):
    layout = r"(?s)nowhere does not exist.*annotations/instances_train2017.json.*val2017/\*.jpg"
    with pytest.raises(MissingDataError, match=layout):
        COCOInstanceDataset(str(coco_root / "nowhere"), "train")
    json_path = coco_root / "annotations" / "instances_val2017.json"
    meta = json.loads(json_path.read_text())
    meta["annotations"][0]["category_id"] = 99
    json_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="annotation 1 has category_id 99, which is not in the JSON's categories"):
        COCOInstanceDataset(str(coco_root), "val")[1]
    meta["annotations"][0]["category_id"] = 1
    meta["images"][0]["height"] = 65
    json_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"000000000042.jpg: the image is 64x80, the JSON says 65x80"):
        COCOInstanceDataset(str(coco_root), "val")[1]
    json_path.write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2017.json: not a COCO instances JSON"):
        COCOInstanceDataset(str(coco_root), "val")


class PredictionStub(torch.nn.Module):
    """predict(..., "instance") returns fixed detections per image, recognised by its size; with
    ``half`` the masks come at half resolution (the evaluator resizes them to the image)."""

    def __init__(self, detections, half=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.detections, self.half = detections, half

    def predict(self, images, task):
        assert task == "instance" and not self.training
        out = []
        for img in images:
            image_id = {v: k for k, v in SIZES.items()}[tuple(img.shape[-2:])]
            dets = self.detections.get(image_id, [])
            masks = torch.from_numpy(np.stack([m for m, _, _ in dets])) if dets else torch.zeros(0, *img.shape[-2:],
                                                                                                 dtype=torch.bool)
            if self.half:
                masks = masks[:, ::2, ::2]
            out.append({"masks": masks, "labels": torch.tensor([c for _, c, _ in dets], dtype=torch.int64),
                        "scores": torch.tensor([s for _, _, s in dets], dtype=torch.float32)})
        return out


def _evaluate(coco_root, stub, tmp_path=None):
    ds = COCOInstanceDataset(str(coco_root), "val")
    loader = val_loader(ds, 2, 0, 1, 0, 32, 255)  # both images in one padded batch
    return run_evaluation(stub, loader, "instance", progress=False,
                          output_path=str(tmp_path / "ap.json") if tmp_path else None)


def test_perfect_predictions_have_AP_100(coco_root, tmp_path):
    stub = PredictionStub({42: [(A, PERSON, 0.9), (B, DOG, 0.8)], 7: [(D, DOG, 0.7), (E, PERSON, 0.6)]}, half=True)
    m = _evaluate(coco_root, stub, tmp_path)
    assert {k: m[k] for k in ("AP", "AP50", "AP75", "APs", "APm")} == pytest.approx(
        dict(AP=100.0, AP50=100.0, AP75=100.0, APs=100.0, APm=100.0))
    assert math.isnan(m["APl"])  # no large object in the fixture
    assert m["per_class"] == pytest.approx({"person": 100.0, "dog": 100.0})
    assert json.loads((tmp_path / "ap.json").read_text())["APl"] is None


def test_partial_predictions_match_the_hand_computation(coco_root):
    # image 42: a person detection on the crowd region (0.95) and A found (0.9); B missed.
    # image 7: a dog false positive (8x8, 0.7) ranked above D found (0.6); E missed.
    fp = _box(7, 0, 8, 0, 8)
    stub = PredictionStub({42: [(C, PERSON, 0.95), (A, PERSON, 0.9)], 7: [(fp, DOG, 0.7), (D, DOG, 0.6)]})
    m = _evaluate(coco_root, stub)
    # person (GT A, E): the crowd hit is ignored, A at precision 1 reaches recall 1/2: precision 1 at
    # the 51 recall points 0, 0.01, ..., 0.50 of 101 -> 51/101. dog (GT B, D): FP then TP, recall 1/2
    # at precision 1/2 -> 25.5/101. Every TP is an exact mask, so all IoU thresholds agree.
    person, dog = 100 * 51 / 101, 100 * 25.5 / 101
    assert m["per_class"] == pytest.approx({"person": person, "dog": dog})
    assert (m["AP"], m["AP50"], m["AP75"]) == pytest.approx(((person + dog) / 2,) * 3)
    # small (GT B, E: both missed; the small FP counts) -> 0; medium (GT A, D: both found, the small
    # FP and the crowd hit are outside or ignored) -> 100; large: no object -> NaN.
    assert (m["APs"], m["APm"]) == pytest.approx((0.0, 100.0)) and math.isnan(m["APl"])


def test_no_detections_is_AP_0(coco_root):
    m = _evaluate(coco_root, PredictionStub({}))
    assert m["AP"] == 0.0 and m["per_class"] == {}


def test_evaluator_argument_errors(coco_root):
    coco = COCOInstanceDataset(str(coco_root), "val").coco
    with pytest.raises(ValueError, match=r"category_ids: expected ids of coco_gt's categories, got \[5\]"):
        InstanceEvaluator(coco, [1, 5])
    ev = InstanceEvaluator(coco, [1, 18])
    with pytest.raises(ValueError, match="image_id: expected an image of the ground-truth JSON, got 3"):
        ev.process(3, torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labels: expected classes in \[0, 2\), got range \[2, 2\]"):
        ev.process(7, torch.ones(1), torch.full((1,), 2), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"scores, labels, masks: expected \[n\], \[n\], \[n,h,w\]"):
        ev.process(7, torch.ones(2), torch.zeros(1, dtype=torch.int64), torch.ones(1, 4, 4, dtype=torch.bool))


TINY = ["model.num_queries=4", "model.hidden_dim=32", "model.mask_dim=32", "model.conv_dim=64", "model.nheads=2",
        "model.dim_feedforward=32", "model.dec_layers=1", "train.device=cpu", "data.name=coco_instance",
        "data.task=instance", "data.num_classes=2", "data.test_size=0"]


def test_cli_prints_AP_by_size(coco_root, tmp_path, capsys):
    cfg = load_config(None, TINY + [f"data.root={coco_root}"])
    torch.save({"model": build_model(cfg, thing_classes=[0, 1]).state_dict()}, tmp_path / "ckpt.pth")
    metrics = main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--task", "instance", *TINY,
                    f"data.root={coco_root}"])
    head = capsys.readouterr().out.splitlines()[0]
    assert [part.split()[0] for part in head.split(" | ")] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    saved = json.loads((tmp_path / "eval_instance.json").read_text())
    assert set(saved) == set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert 0 <= metrics["AP"] <= 100 and metrics["APl"] != metrics["APl"]  # a random model; no large objects
