"""The procedural dataset (determinism, sample format, learnable classes), build_dataset, and collate."""
import numpy as np
import pytest
import torch

from fastmaskformer.config import DataConfig
from fastmaskformer.data import SyntheticDataset, build_dataset, collate

SIZE = 48


@pytest.fixture(scope="module")
def semantic():
    return SyntheticDataset("train", length=8, image_size=SIZE, seed=3)


@pytest.fixture(scope="module")
def panoptic():
    return SyntheticDataset("train", length=8, image_size=SIZE, seed=3, task="panoptic")


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("image", "labels", "masks", "sem_seg", "pan_seg")) \
        and a["segments"] == b["segments"]


def test_deterministic_by_seed_split_and_index(semantic):
    again = SyntheticDataset("train", length=8, image_size=SIZE, seed=3)
    assert _same(semantic[5], again[5]) and _same(semantic[5], semantic[5])
    assert not torch.equal(semantic[5]["image"], semantic[4]["image"])
    assert not torch.equal(semantic[5]["image"], SyntheticDataset("train", 8, SIZE, seed=4)[5]["image"])
    assert not torch.equal(semantic[5]["image"], SyntheticDataset("val", 8, SIZE, seed=3)[5]["image"])


def test_semantic_sample_format(semantic):
    for i in range(len(semantic)):
        s = semantic[i]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, SIZE, SIZE)
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["sem_seg"].dtype == torch.int64 and s["sem_seg"].shape == (SIZE, SIZE)
        assert s["labels"].dtype == torch.int64 and s["masks"].dtype == torch.bool
        # One mask per present class, exactly where sem_seg has that class.
        assert s["labels"].tolist() == torch.unique(s["sem_seg"]).tolist()
        for label, mask in zip(s["labels"], s["masks"]):
            assert torch.equal(mask, s["sem_seg"] == label)
        assert s["sem_seg"].max() < SyntheticDataset.num_classes


def test_panoptic_sample_format(panoptic):
    things = set(SyntheticDataset.thing_classes)
    n_things = 0
    for i in range(len(panoptic)):
        s = panoptic[i]
        ids = [seg["id"] for seg in s["segments"]]
        assert sorted(torch.unique(s["pan_seg"]).tolist()) == sorted(ids) and 0 not in ids
        assert s["labels"].tolist() == [seg["category_id"] for seg in s["segments"]]
        stuff = [seg["category_id"] for seg in s["segments"] if not seg["isthing"]]
        assert len(stuff) == len(set(stuff))  # stuff: one segment per class
        for seg, mask in zip(s["segments"], s["masks"]):
            assert torch.equal(mask, s["pan_seg"] == seg["id"])
            assert seg["isthing"] == (seg["category_id"] in things)
            assert (s["sem_seg"][mask] == seg["category_id"]).all()
            n_things += seg["isthing"]
        assert s["masks"].sum(0).eq(1).all()  # segments tile the image
    assert n_things > len(panoptic)  # several instances per image on average


def test_classes_are_recognizable_from_appearance():
    """A nearest-mean-colour classifier, fitted on some images' pixels, labels other images' pixels
    well above chance: the classes are learnable from their colour and texture."""
    ds = SyntheticDataset("train", length=12, image_size=SIZE, seed=0)
    K = ds.num_classes

    def pixels(i):
        s = ds[i]
        return s["image"].reshape(3, -1).T.double(), s["sem_seg"].reshape(-1)

    x, y = map(torch.cat, zip(*[pixels(i) for i in range(8)]))
    means = torch.stack([x[y == k].mean(0) for k in range(K)])
    xt, yt = map(torch.cat, zip(*[pixels(i) for i in range(8, 12)]))
    accuracy = (torch.cdist(xt, means).argmin(1) == yt).double().mean().item()
    assert accuracy > 0.6, accuracy


def test_bad_arguments(semantic):
    with pytest.raises(IndexError):
        semantic[len(semantic)]
    with pytest.raises(ValueError, match="task"):
        SyntheticDataset(task="instance")


def test_build_dataset():
    cfg = DataConfig(image_size=32, train_length=5, val_length=3, seed=1)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val), train[0]["image"].shape) == (5, 3, (3, 32, 32))
    assert not torch.equal(train[0]["image"], val[0]["image"])
    with pytest.raises(ValueError, match="data.name"):
        build_dataset(DataConfig(name="imagenet"), "train")


def _sample(h, w, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(0, 4, (h, w), generator=g)
    return dict(image=torch.rand(3, h, w, generator=g), labels=torch.arange(n),
                masks=sem[None] == torch.arange(n)[:, None, None], sem_seg=sem, pan_seg=sem + 1,
                segments=[{"id": 1, "category_id": 0, "isthing": False}], file=f"f{h}")


@pytest.mark.parametrize("div", [1, 8, 32])
def test_collate_pads_to_a_multiple_of_size_divisibility(div):
    samples = [_sample(13, 20, 3), _sample(17, 9, 0, seed=1)]  # odd sizes; the second has no segment
    b = collate(samples, size_divisibility=div, ignore_label=254)
    H, W = (-(-17 // div) * div, -(-20 // div) * div)
    assert b["images"].shape == (2, 3, H, W) and b["image_sizes"] == [(13, 20), (17, 9)]
    assert b["sem_seg"].shape == (2, H, W) and b["pan_seg"].shape == (2, H, W)
    for i, s in enumerate(samples):
        h, w = s["image"].shape[-2:]
        assert torch.equal(b["images"][i, :, :h, :w], s["image"])
        assert torch.equal(b["sem_seg"][i, :h, :w], s["sem_seg"])
        assert torch.equal(b["pan_seg"][i, :h, :w], s["pan_seg"])
        outside = torch.ones(H, W, dtype=torch.bool)
        outside[:h, :w] = False
        assert (b["images"][i][:, outside] == 0).all()
        assert (b["sem_seg"][i][outside] == 254).all() and (b["pan_seg"][i][outside] == 0).all()
        t = b["targets"][i]
        assert t["masks"].shape == (len(s["labels"]), H, W) and t["masks"].dtype == torch.bool
        assert torch.equal(t["masks"][:, :h, :w], s["masks"]) and not t["masks"][:, outside].any()
        assert torch.equal(t["labels"], s["labels"])
    assert b["segments"] == [s["segments"] for s in samples] and b["files"] == ["f13", "f17"]


def test_collate_non_contiguous_and_optional_keys():
    s = _sample(10, 12, 2)
    s["image"] = torch.rand(3, 12, 10).transpose(1, 2)  # non-contiguous view
    del s["pan_seg"], s["segments"], s["file"]
    b = collate([s], size_divisibility=16)
    assert torch.equal(b["images"][0, :, :10, :12], s["image"])
    assert "pan_seg" not in b and "segments" not in b and "files" not in b
    with pytest.raises(ValueError, match="samples"):
        collate([])
    with pytest.raises(ValueError, match="size_divisibility"):
        collate([s], size_divisibility=0)


def test_collate_of_dataset_samples(semantic):
    b = collate([semantic[0], semantic[1]], size_divisibility=32)
    assert b["images"].shape == (2, 3, 64, 64) and np.all(np.array(b["image_sizes"]) == SIZE)
