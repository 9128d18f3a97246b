"""Augmentation keeps image and annotation maps aligned, respects the crop's class-area rule and pads
with the right values; resampling and colour rules are checked against independent computations
(PIL's NEAREST resize, colorsys' HSV)."""
import colorsys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaskformer.data.transforms import (RandomCropCategoryArea, RandomFlip, ResizeShortestEdge, _saturate,
                                            add_targets, build_transforms, resize, shortest_edge_size, train_scales)

PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]])


def _cfg(**kw):
    base = dict(crop_size=(24, 32), min_scale=0.5, max_scale=2.0, max_single_class_ratio=1.0, flip=True,
                color_jitter=False, ignore_label=255, size_divisibility=32, test_size=0, test_max_size=0)
    return SimpleNamespace(**{**base, **kw})


def _coloured_sample(h=40, w=56, block=8, seed=0):
    """Blocks of random classes (3 = ignored); the image colour is the class's palette colour and the
    panoptic id is 10 * (class + 1) + block column parity, so all three maps encode the class."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 4, (h // block, w // block), generator=g)
    cls = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    inst = (torch.arange(w) // block % 2).expand(h, w)
    sem = torch.where(cls == 3, 255, cls)
    pan = torch.where(cls == 3, 0, 10 * (cls + 1) + inst)
    segs = [dict(id=int(i), category_id=int(i) // 10 - 1, isthing=True, iscrowd=int(i % 10 == 1 and i // 10 == 2))
            for i in torch.unique(pan).tolist() if i]
    return dict(image=PALETTE[cls].permute(2, 0, 1).contiguous(), sem_seg=sem, pan_seg=pan, segments=segs,
                file="x.png")


def _interior(label):
    """Pixels whose 5x5 neighbourhood has one label: there bilinear colour equals the label's colour."""
    lab = label.float()[None, None]
    lo = -torch.nn.functional.max_pool2d(-lab, 5, 1, 2, )[0, 0]
    hi = torch.nn.functional.max_pool2d(lab, 5, 1, 2)[0, 0]
    inner = torch.zeros_like(label, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    return (lo == hi) & inner


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_maps_aligned(seed):
    torch.manual_seed(seed)
    t = build_transforms(_cfg(), train=True)
    s = t(_coloured_sample(seed=seed))
    img, sem, pan = s["image"], s["sem_seg"], s["pan_seg"]
    assert img.shape == (3, 24, 32) and sem.shape == pan.shape == (24, 32)
    valid = sem != 255
    assert valid.any()
    # colour <-> class on interior pixels; pan_seg <-> sem_seg everywhere
    inner = _interior(sem) & valid
    torch.testing.assert_close(img.permute(1, 2, 0)[inner], PALETTE[sem[inner]], atol=1e-4, rtol=0)
    assert torch.equal(pan[valid] // 10 - 1, sem[valid]) and (pan[~valid] == 0).all()
    # targets re-derived after the crop: one mask per non-crowd segment present, none empty
    ids = {s_["id"]: s_ for s_ in s["segments"]}
    assert set(ids) == set(torch.unique(pan).tolist()) - {0}
    assert len(s["masks"]) == sum(1 for x in ids.values() if not x["iscrowd"])
    for lab, m in zip(s["labels"], s["masks"]):
        assert m.any() and torch.equal(sem[m], torch.full((int(m.sum()),), int(lab)))


def test_scale_draws_and_flips():
    torch.manual_seed(0)
    sample = _coloured_sample(h=16, w=24)
    steps = build_transforms(_cfg(crop_size=(512, 512), min_scale=0.5, max_scale=2.0), train=True).steps
    assert steps[0].sizes == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]
    assert steps[0].max_size == 2048
    r = ResizeShortestEdge([8, 16, 32], 40)
    assert {tuple(r(sample)["image"].shape[-2:]) for _ in range(30)} == {(8, 12), (16, 24), (27, 40)}
    flipped = [torch.equal(RandomFlip()(sample)["sem_seg"], sample["sem_seg"].flip(-1)) for _ in range(40)]
    assert 10 < sum(flipped) < 30


def test_crop_respects_max_single_class_ratio():
    # Columns 12-27 class 1, the rest class 0, top rows ignored. A 16-wide crop at x0 holds
    # 16 - |x0 - 12| columns of class 1 and qualifies (no class >= 75%) for 14 of its 25 positions, so
    # 10 draws all miss with probability 0.44^10 < 3e-4; without the rule 11 positions violate it.
    sem = torch.zeros(16, 40, dtype=torch.long)
    sem[:, 12:28] = 1
    sem[:4] = 255
    sample = dict(image=torch.zeros(3, 16, 40), sem_seg=sem)

    def share(s):
        lab = s["sem_seg"][s["sem_seg"] != 255]
        return torch.bincount(lab, minlength=2).max().item() / lab.numel(), len(torch.unique(lab))

    torch.manual_seed(0)
    constrained = [share(RandomCropCategoryArea((16, 16), 0.75, 255)(sample)) for _ in range(20)]
    assert all(r < 0.75 and n == 2 for r, n in constrained)
    free = [share(RandomCropCategoryArea((16, 16), 1.0, 255)(sample)) for _ in range(20)]
    assert sum(r >= 0.75 for r, _ in free) >= 4


def test_padding_values_and_no_masks_in_padding():
    torch.manual_seed(0)
    t = build_transforms(_cfg(crop_size=(64, 80), min_scale=1.0, max_scale=1.0, flip=False), train=True)
    sample = _coloured_sample(h=16, w=24, block=8)  # base 80: shorter side 16 -> 80, longer 24 -> 120
    s = t(sample)
    assert s["image"].shape == (3, 64, 80)
    torch.manual_seed(0)
    small = build_transforms(_cfg(crop_size=(64, 80), base_size=32, min_scale=1.0, max_scale=1.0, flip=False),
                             train=True)(sample)  # 32 x 48 resized image, padded to 64 x 80
    assert (small["image"][:, 32:] == 0).all() and (small["image"][:, :, 48:] == 0).all()
    assert (small["sem_seg"][32:] == 255).all() and (small["sem_seg"][:, 48:] == 255).all()
    assert (small["pan_seg"][32:] == 0).all() and (small["pan_seg"][:, 48:] == 0).all()
    assert not small["masks"][:, 32:].any() and not small["masks"][:, :, 48:].any()


def test_eval_transform_resizes_shortest_edge_only():
    t = build_transforms(_cfg(test_size=20, test_max_size=30), train=False)
    s = t(_coloured_sample(h=40, w=56))
    assert s["image"].shape == (3, 20, 28)  # 40x56 -> shorter 20, 28 < 30
    s = t(_coloured_sample(h=16, w=40, block=8))  # shorter 16 -> 20 makes 50 > 30: capped 12 x 30
    assert s["sem_seg"].shape == (12, 30)
    assert build_transforms(_cfg(), train=False)(_coloured_sample())["image"].shape == (3, 40, 56)  # test_size 0


def test_label_resize_matches_pil_nearest():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 200, (13, 17), dtype=np.uint8)
    for size in [(29, 40), (6, 7), (13, 30)]:
        ours = resize(dict(image=torch.zeros(3, 13, 17), sem_seg=torch.from_numpy(lab).long()), size)["sem_seg"]
        pil = np.array(Image.fromarray(lab).resize(size[::-1], Image.NEAREST))
        assert torch.equal(ours, torch.from_numpy(pil).long()), size


def test_shortest_edge_and_scales_arithmetic():
    assert shortest_edge_size(480, 640, 512, 2048) == (512, 683)
    assert shortest_edge_size(100, 1000, 512, 2048) == (205, 2048)
    assert shortest_edge_size(640, 480, 256, 2048) == (341, 256)
    scales = train_scales(0.5, 2.0)
    assert len(scales) == 16 and scales[0] == 0.5 and scales[-1] == pytest.approx(2.0)
    assert [int(512 * s) for s in scales][:3] == [256, 307, 358]


def test_saturation_matches_hsv():
    rgb = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.3, 0.3], [0.0, 0.2, 0.8], [0.6, 0.55, 0.5]])
    for factor in (0.5, 1.4, 3.0):
        out = _saturate(rgb.T[:, :, None], factor)[:, :, 0].T
        for px, got in zip(rgb.tolist(), out):
            h, s, v = colorsys.rgb_to_hsv(*px)
            expected = colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)
            torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_color_jitter_changes_only_the_image():
    torch.manual_seed(0)
    t = build_transforms(_cfg(color_jitter=True, flip=False, crop_size=(400, 400), min_scale=1.0, max_scale=1.0,
                              base_size=40), train=True)
    sample = _coloured_sample()
    outs = [t(sample) for _ in range(8)]
    assert all(torch.equal(o["sem_seg"][:40, :56], sample["sem_seg"]) for o in outs)
    assert all(0 <= o["image"].min() and o["image"].max() <= 1 for o in outs)
    assert sum(not torch.allclose(o["image"][:, :40, :56], sample["image"]) for o in outs) >= 6


def test_add_targets_semantic_without_classes():
    s = add_targets(dict(image=torch.zeros(3, 2, 2), sem_seg=torch.full((2, 2), 255)))
    assert s["labels"].shape == (0,) and s["masks"].shape == (0, 2, 2) and s["masks"].dtype == torch.bool


def test_build_transforms_with_engine_config():
    from fastmaskformer.config import DataConfig

    cfg = DataConfig(name="ade20k", crop_size=(32, 32), color_jitter=True)
    torch.manual_seed(0)
    s = build_transforms(cfg, train=True)(_coloured_sample())
    assert s["image"].shape == (3, 32, 32) and s["masks"].shape[1:] == (32, 32)
