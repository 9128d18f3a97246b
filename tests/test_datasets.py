"""The on-disk readers against tiny fixture folders written in the datasets' real formats (JPEG/PNG
images, 8-bit and 16-bit label PNGs, RGB-encoded panoptic PNGs and a panoptic JSON); expected values
follow from the format definitions, not from the readers."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaskformer.data.ade20k import ADE20KDataset
from fastmaskformer.data.cityscapes import CityscapesDataset
from fastmaskformer.data.coco_panoptic import COCOPanopticDataset

COLOUR = (200, 40, 90)


def _save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _rgb(h, w):
    return np.broadcast_to(np.array(COLOUR, np.uint8), (h, w, 3)).copy()


def _check_image(img, h, w):
    assert img.dtype == torch.float32 and img.shape == (3, h, w)
    torch.testing.assert_close(img.mean((1, 2)), torch.tensor(COLOUR) / 255, atol=3 / 255, rtol=0)  # JPEG


def _check_masks(sample, expected):
    """expected: {label: bool [H,W] mask}, compared regardless of order."""
    got = {int(l): m for l, m in zip(sample["labels"], sample["masks"])}
    assert sample["masks"].dtype == torch.bool and sample["labels"].dtype == torch.int64
    assert sorted(got) == sorted(expected)
    for k, m in expected.items():
        assert torch.equal(got[k], m), k


# ------------------------------------------------------------------ ADE20K
ADE_RAW = np.array([[0, 1, 1, 2], [150, 150, 2, 0], [1, 1, 1, 1]], np.uint8)  # 0 = "other"


@pytest.fixture
def ade_root(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for folder, name in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _save(str(base / "images" / folder / f"{name}.jpg"), _rgb(3, 4), quality=100)
        _save(str(base / "annotations" / folder / f"{name}.png"), ADE_RAW)
    return tmp_path


def test_ade20k_decodes_labels(ade_root):
    ds = ADE20KDataset(str(ade_root), "val")
    assert len(ds) == 1 and ds.num_classes == 150 and len(ds.class_names) == 150
    assert len(ds.thing_classes) == 100 and sorted(ds.thing_classes + ds.stuff_classes) == list(range(150))
    s = ds[0]
    _check_image(s["image"], 3, 4)
    expected = torch.tensor([[255, 0, 0, 1], [149, 149, 1, 255], [0, 0, 0, 0]])
    assert torch.equal(s["sem_seg"], expected)
    _check_masks(s, {c: expected == c for c in (0, 1, 149)})
    assert s["file"].endswith(os.path.join("validation", "ADE_val_00000001.jpg"))
    assert ADE20KDataset(str(ade_root / "ADEChallengeData2016"), "train")[0]["sem_seg"].equal(expected)


def test_ade20k_errors_name_the_path(ade_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)does_not_exist.*annotations/training"):
        ADE20KDataset(str(ade_root / "does_not_exist"), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        ADE20KDataset(str(ade_root), "test")
    ann = ade_root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"
    ann.write_bytes(ann.read_bytes()[:40])  # a truncated PNG
    ds = ADE20KDataset(str(ade_root), "val")
    with pytest.raises(ValueError, match=f"cannot decode {ann}"):
        ds[0]
    ann.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing file: {ann}"):
        ds[0]
    (ade_root / "ADEChallengeData2016" / "annotations" / "training").rename(ade_root / "moved")
    with pytest.raises(FileNotFoundError, match=r"(?s)annotations/training does not exist.*images/validation"):
        ADE20KDataset(str(ade_root), "train")


# ------------------------------------------------------------------ COCO panoptic
# Categories (deliberately not 0-based or contiguous): person 1 (thing), car 3 (thing), banner 92 (stuff).
CATS = [dict(id=1, name="person", isthing=1), dict(id=3, name="car", isthing=1), dict(id=92, name="banner", isthing=0)]
PERSON, CROWD, BANNER = 3 + 2 * 256 + 1 * 65536, 7, 300  # ids touching all three colour channels
PAN_IDS = np.array([[PERSON, PERSON, CROWD, 0], [BANNER, BANNER, CROWD, 0]])


@pytest.fixture
def coco_root(tmp_path):
    rgb = np.stack([PAN_IDS % 256, PAN_IDS // 256 % 256, PAN_IDS // 65536], -1).astype(np.uint8)
    _save(str(tmp_path / "panoptic_val2017" / "000000000139.png"), rgb)
    _save(str(tmp_path / "val2017" / "000000000139.jpg"), _rgb(2, 4), quality=100)
    segments = [dict(id=PERSON, category_id=1, iscrowd=0, area=2), dict(id=CROWD, category_id=3, iscrowd=1, area=2),
                dict(id=BANNER, category_id=92, iscrowd=0, area=2)]
    meta = dict(images=[dict(id=139, file_name="000000000139.jpg", height=2, width=4)], categories=CATS,
                annotations=[dict(image_id=139, file_name="000000000139.png", segments_info=segments)])
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(meta))
    return tmp_path


def test_coco_panoptic_decodes_ids_categories_crowd(coco_root):
    ds = COCOPanopticDataset(str(coco_root), "val")
    assert (ds.num_classes, ds.class_names, ds.thing_classes, ds.stuff_classes) == (3, ["person", "car", "banner"],
                                                                                   [0, 1], [2])
    assert COCOPanopticDataset.num_classes == 133 and len(COCOPanopticDataset.thing_classes) == 80
    s = ds[0]
    _check_image(s["image"], 2, 4)
    pan = torch.from_numpy(PAN_IDS)
    assert torch.equal(s["pan_seg"], pan)
    assert torch.equal(s["sem_seg"], torch.tensor([[0, 0, 1, 255], [2, 2, 1, 255]]))
    assert sorted(s["segments"], key=lambda x: x["id"]) == [
        dict(id=CROWD, category_id=1, isthing=True, iscrowd=1),
        dict(id=BANNER, category_id=2, isthing=False, iscrowd=0),
        dict(id=PERSON, category_id=0, isthing=True, iscrowd=0)]
    _check_masks(s, {0: pan == PERSON, 2: pan == BANNER})  # the crowd car gets no training mask


def test_coco_panoptic_errors(coco_root):
    json_path = coco_root / "annotations" / "panoptic_val2017.json"
    meta = json.loads(json_path.read_text())
    meta["annotations"][0]["segments_info"].pop()  # BANNER's pixels lose their segment
    json_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"000000000139.png: segment ids \[{BANNER}\] appear in the PNG"):
        COCOPanopticDataset(str(coco_root), "val")[0]
    (coco_root / "val2017" / "000000000139.jpg").unlink()
    meta["annotations"][0]["segments_info"] = []
    meta["annotations"][0]["file_name"] = "missing.png"
    json_path.write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="missing file: .*panoptic_val2017/missing.png"):
        COCOPanopticDataset(str(coco_root), "val")[0]
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match="panoptic_val2017.json: not a COCO panoptic JSON"):
        COCOPanopticDataset(str(coco_root), "val")
    with pytest.raises(FileNotFoundError, match=r"(?s)annotations/panoptic_train2017.json does not exist.*train2017"):
        COCOPanopticDataset(str(coco_root), "train")


# ------------------------------------------------------------------ Cityscapes
# label ids: 7 road -> 0, 26 car -> 13, 24 person -> 11, 0 unlabeled / 29 caravan / 1 ego vehicle -> ignore
CS_LABEL_IDS = np.array([[7, 7, 26, 26, 26], [0, 29, 24, 33, 1]], np.uint8)
# instanceIds: car instance 26001, a car group region (26: crowd), person 24000, bicycle 33000;
# caravan 29000 is an instance of an ignored class
CS_INSTANCE_IDS = np.array([[7, 7, 26001, 26001, 26], [0, 29000, 24000, 33000, 1]], np.uint16)


@pytest.fixture
def cs_root(tmp_path):
    name = "aachen_000000_000019"
    _save(str(tmp_path / "leftImg8bit" / "val" / "aachen" / f"{name}_leftImg8bit.png"), _rgb(2, 5))
    _save(str(tmp_path / "gtFine" / "val" / "aachen" / f"{name}_gtFine_labelIds.png"), CS_LABEL_IDS)
    _save(str(tmp_path / "gtFine" / "val" / "aachen" / f"{name}_gtFine_instanceIds.png"), CS_INSTANCE_IDS)
    return tmp_path


def test_cityscapes_semantic_mapping(cs_root):
    s = CityscapesDataset(str(cs_root), "val")[0]
    _check_image(s["image"], 2, 5)
    expected = torch.tensor([[0, 0, 13, 13, 13], [255, 255, 11, 18, 255]])
    assert torch.equal(s["sem_seg"], expected)
    _check_masks(s, {c: expected == c for c in (0, 11, 13, 18)})
    assert "pan_seg" not in s


def test_cityscapes_panoptic_segments(cs_root):
    s = CityscapesDataset(str(cs_root), "val", panoptic=True)[0]
    ids = torch.from_numpy(CS_INSTANCE_IDS.astype(np.int64))
    assert torch.equal(s["pan_seg"], torch.where(torch.isin(ids, torch.tensor([0, 29000, 1])), 0, ids))
    assert s["segments"] == [dict(id=7, category_id=0, isthing=False, iscrowd=0),
                             dict(id=26, category_id=13, isthing=True, iscrowd=1),
                             dict(id=24000, category_id=11, isthing=True, iscrowd=0),
                             dict(id=26001, category_id=13, isthing=True, iscrowd=0),
                             dict(id=33000, category_id=18, isthing=True, iscrowd=0)]
    _check_masks(s, {0: ids == 7, 11: ids == 24000, 13: ids == 26001, 18: ids == 33000})


def test_cityscapes_layout_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)leftImg8bit/train does not exist.*gtFine_labelIds.png"):
        CityscapesDataset(str(tmp_path), "train")


def test_build_dataset_and_collate(ade_root, coco_root):
    from fastmaskformer.config import DataConfig
    from fastmaskformer.data import build_dataset, collate

    train = build_dataset(DataConfig(name="ade20k", root=str(ade_root), num_classes=150, crop_size=(8, 8)), "train")
    s = train[0]
    assert s["image"].shape == (3, 8, 8) and s["masks"].shape[1:] == (8, 8)
    val = build_dataset(DataConfig(name="coco_panoptic", root=str(coco_root), test_size=4, test_max_size=100), "val")
    batch = collate([val[0], val[0]], size_divisibility=32)
    assert batch["images"].shape == (2, 3, 32, 32) and batch["image_sizes"] == [(4, 8), (4, 8)]
    assert batch["pan_seg"].shape == (2, 32, 32) and len(batch["segments"]) == 2
