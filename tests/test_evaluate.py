"""run_evaluation on stub models whose predictions are known: the colour of each pixel is its class
(a one-hot RGB image), and the stub returns that image as the class scores."""
import json
import math

import pytest
import torch

from fastmaskformer.evaluate import run_evaluation

K = 3


class ColourStub(torch.nn.Module):
    """predict: semantic scores = the image's RGB channels; panoptic = one stuff segment per class
    (id = class + 1). Records every batch shape it sees."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def predict(self, images, task):
        assert not self.training
        self.seen.append([tuple(i.shape) for i in images])
        out = []
        for img in images:
            if task == "semantic":
                out.append({"sem_seg": img * self.scale})
            else:
                cls = img.argmax(0)
                out.append({"panoptic_seg": (cls + 1, [dict(id=c + 1, category_id=c, isthing=False, score=1.0)
                                                       for c in cls.unique().tolist()])})
        return out


def _one_hot_image(block_classes, block=4):
    cls = torch.tensor(block_classes).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.nn.functional.one_hot(cls, K).permute(2, 0, 1).float(), cls


def _batch():
    """Two images (8x12 and 4x8) padded to 8x12 as collate does: zeros in images, 255 in sem_seg."""
    img1, cls1 = _one_hot_image([[0, 1, 2], [2, 0, 1]])
    img2, cls2 = _one_hot_image([[2, 1]])
    images = torch.zeros(2, 3, 8, 12)
    images[0] = img1
    images[1, :, :4, :8] = img2
    sem = torch.full((2, 8, 12), 255)
    sem[0] = cls1
    sem[1, :4, :8] = cls2
    sem[0, :4, :4] = 1  # block (0,0) predicted 0, labelled 1
    sem[0, 4:, 8:] = 255  # block (1,2) ignored
    pan = torch.zeros(2, 8, 12, dtype=torch.long)
    pan[0], pan[1, :4, :8] = cls1 + 1, cls2 + 1
    segs = [[dict(id=c + 1, category_id=c, isthing=False, iscrowd=0) for c in range(K)]] * 2
    return dict(images=images, image_sizes=[(8, 12), (4, 8)], sem_seg=sem, pan_seg=pan, segments=segs)


# Over both images (ignored pixels excluded): class 0 tp 16, gt 16, pred 32 -> IoU 1/2;
# class 1 tp 32, gt 48, pred 32 -> IoU 2/3; class 2 tp 48, gt 48, pred 48 -> IoU 1. 96 of 112 correct.
EXPECTED_MIOU = 100 * (0.5 + 2 / 3 + 1) / 3


def test_semantic_mIoU(tmp_path):
    model = ColourStub()
    out = tmp_path / "metrics.json"
    m = run_evaluation(model, [_batch()], "semantic", num_classes=K, progress=False, output_path=str(out))
    assert m["mIoU"] == pytest.approx(EXPECTED_MIOU)
    assert m["pixel_acc"] == pytest.approx(100 * 96 / 112)
    assert model.seen == [[(3, 8, 12), (3, 4, 8)]]  # one batch of unpadded images at scale 1
    assert model.training  # the train/eval state is restored
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(EXPECTED_MIOU)


def test_multi_scale_flip_equals_single_scale_for_invariant_stub():
    # 4x4 blocks of one-hot colour stay the per-pixel argmax under x0.5/x2 bilinear resizing.
    model = ColourStub()
    m = run_evaluation(model, [_batch()], "semantic", num_classes=K, multi_scale=[0.5, 1.0, 2.0], flip=True,
                       progress=False)
    assert m["mIoU"] == pytest.approx(EXPECTED_MIOU)
    assert m["per_class_iou"] == pytest.approx({"0": 50.0, "1": 200 / 3, "2": 100.0})
    assert model.seen == [[(3, 4, 6), (3, 2, 4)]] * 2 + [[(3, 8, 12), (3, 4, 8)]] * 2 + [[(3, 16, 24), (3, 8, 16)]] * 2


class HeightStub(torch.nn.Module):
    """Spatially constant scores: class 0 = input height / 100, class 1 = 0.45: the average over
    scales decides the winner, so the test sees whether views are averaged."""

    def predict(self, images, task):
        return [{"sem_seg": torch.tensor([i.shape[-2] / 100, 0.45, 0.0])[:, None, None].expand(K, *i.shape[-2:])}
                for i in images]


@pytest.mark.parametrize("scales,winner", [((1.0,), 1), ((1.0, 1.5), 0), ((0.5, 1.0, 1.5), 1)])
def test_scores_are_averaged_over_scales(scales, winner):
    batch = dict(images=torch.zeros(1, 3, 40, 40), image_sizes=[(40, 40)],
                 sem_seg=torch.full((1, 40, 40), winner))  # scores 0.4 | mean(0.4, 0.6) | mean(0.2, 0.4, 0.6)
    m = run_evaluation(HeightStub(), [batch], "semantic", num_classes=K, multi_scale=scales, progress=False)
    assert m["pixel_acc"] == 100.0


class _Loader(list):
    class dataset:  # noqa: N801 - stands in for a dataset object with class attributes
        num_classes = K
        class_names = ["a", "b", "c"]
        thing_classes = []


def test_panoptic_crops_padding_and_reads_dataset_metadata(tmp_path):
    m = run_evaluation(ColourStub(), _Loader([_batch()]), "panoptic", progress=False,
                       output_path=str(tmp_path / "pq.json"))
    assert m["PQ"] == 100.0 and m["PQ_st"] == 100.0 and math.isnan(m["PQ_th"])
    assert set(m["per_class"]) == {"a", "b", "c"}
    assert json.loads((tmp_path / "pq.json").read_text())["PQ_th"] is None  # strict JSON: NaN -> null


def test_progress_bar_path_runs():
    metrics = run_evaluation(ColourStub(), [_batch()], num_classes=K, progress=True)
    assert metrics["mIoU"] == pytest.approx(EXPECTED_MIOU)


@pytest.mark.parametrize("kwargs,match", [
    (dict(task="depth", num_classes=K), "task: expected one of"),
    (dict(task="panoptic", num_classes=K, thing_classes=[], flip=True), "not defined for task='panoptic'"),
    (dict(task="semantic"), "num_classes: not given"),
    (dict(task="panoptic", num_classes=K), "thing_classes: needed"),
    (dict(task="panoptic", num_classes=K, thing_classes=[],
          loader=[{k: v for k, v in _batch().items() if k not in ("pan_seg", "segments")}]), "no pan_seg"),
])
def test_bad_arguments(kwargs, match):
    loader = kwargs.pop("loader", [_batch()])
    with pytest.raises(ValueError, match=match):
        run_evaluation(ColourStub(), loader, progress=False, **kwargs)


# conv_dim 64: GroupNorm(32) needs more than one value per group at the 1x1 stride-32 map of 32px images.
TINY = ["model.backbone=resnet18", "model.num_queries=4", "model.hidden_dim=32", "model.mask_dim=32",
        "model.conv_dim=64", "model.nheads=2", "model.dim_feedforward=32", "model.dec_layers=1", "data.name=synthetic",
        "data.image_size=32", "data.val_length=1", "train.device=cpu"]


@pytest.mark.parametrize("extra", [[], ["--multi-scale", "--flip"], ["--task", "panoptic", "data.task=panoptic"]])
def test_cli_evaluates_a_checkpoint_of_the_real_model(tmp_path, monkeypatch, extra):
    import fastmaskformer.evaluate as ev
    from fastmaskformer.config import load_config
    from fastmaskformer.engine.build import build_model
    from fastmaskformer.evaluate import main

    monkeypatch.setattr(ev, "MULTI_SCALES", (0.5, 1.0))  # the official six scales cost seconds of CPU here

    cfg = load_config(None, TINY + [e for e in extra if "=" in e])
    torch.save({"model": build_model(cfg, thing_classes=[5, 6, 7]).state_dict()}, tmp_path / "ckpt.pth")
    metrics = main(["--checkpoint", str(tmp_path / "ckpt.pth"), *extra, *TINY])
    task = "panoptic" if "panoptic" in extra else "semantic"
    saved = json.loads((tmp_path / f"eval_{task}.json").read_text())
    key = "PQ" if task == "panoptic" else "pixel_acc"
    assert set(saved) == set(metrics) and key in saved
    assert metrics[key] != metrics[key] or 0 <= metrics[key] <= 100  # NaN or a percentage


def test_cli_errors(tmp_path, capsys):
    from fastmaskformer.evaluate import main

    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "nope.pth")])
    assert "nope.pth does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "nope.pth"), "data.bogus=1"])
    assert "data.bogus" in capsys.readouterr().err
