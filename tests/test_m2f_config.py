"""The Mask2Former recipes (configs/mask2former_*.yaml): the official hyperparameters, each one builds
(at a tiny size, so no R50 is built here) into a Mask2Former whose matcher and criterion take the
recipe's point sampling, the synthetic recipe's own model computes a finite loss, and MaskFormer
refuses the Mask2Former-only fields."""
import os

import pytest
import torch

from fastmaskformer import Mask2Former
from fastmaskformer.config import REPO_ROOT, ConfigError, load_config
from fastmaskformer.engine.build import build_model

OFFICIAL = {  # name: (dataset, task, classes, crop, max_iter, schedule)
    "ade20k_r50": ("ade20k", "semantic", 150, (512, 512), 160000, "poly"),
    "coco_panoptic_r50": ("coco_panoptic", "panoptic", 133, (1024, 1024), 368750, "step"),
    "coco_instance_r50": ("coco_instance", "instance", 80, (1024, 1024), 368750, "step"),
    "cityscapes_r50": ("cityscapes", "semantic", 19, (512, 1024), 90000, "poly"),
}
TINY = ["model.backbone=resnet18", "model.num_queries=4", "model.hidden_dim=32", "model.mask_dim=32",
        "model.conv_dim=32", "model.nheads=2", "model.dim_feedforward=32", "model.dec_layers=2", "model.enc_layers=1",
        "model.enc_nheads=2", "model.enc_n_points=1", "model.enc_dim_feedforward=32"]


def path(name):
    return os.path.join(REPO_ROOT, "configs", f"mask2former_{name}.yaml")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe(name):
    cfg = load_config(path(name))
    m, d, s = cfg.model, cfg.data, cfg.solver
    assert (m.meta_architecture, m.backbone, m.num_queries, m.hidden_dim, m.dim_feedforward, m.dec_layers) == \
        ("mask2former", "resnet50", 100, 256, 2048, 9)
    assert (m.enc_layers, m.enc_nheads, m.enc_n_points, m.enc_dim_feedforward, m.dropout) == (6, 8, 4, 1024, 0.0)
    assert (m.class_weight, m.mask_weight, m.dice_weight, m.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (m.num_points, m.oversample_ratio, m.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert (s.lr, s.weight_decay, s.backbone_multiplier, s.clip_grad, s.amp, s.batch_size) == \
        (1e-4, 0.05, 0.1, 0.01, "fp16", 16)
    assert (d.name, d.task, d.num_classes, d.crop_size, s.max_iter, s.lr_scheduler) == OFFICIAL[name]
    if s.lr_scheduler == "step":  # COCO: x0.1 at 88.9% and 96.3% of the 50 epochs, as the official config
        assert s.steps == (327778, 355092) and s.gamma == 0.1
    if name.startswith("coco"):  # large-scale jitter at 1024: scales 0.1 .. 2.0
        assert (d.base_size, d.min_scale, d.max_scale) == (1024, 0.1, 2.0)


@pytest.mark.parametrize("name", sorted(OFFICIAL) + ["synthetic"])
def test_recipe_builds_at_a_tiny_size(name):
    cfg = load_config(path(name), TINY)
    model = build_model(cfg)
    assert isinstance(model, Mask2Former)
    assert model.matcher.num_points == model.criterion.num_points == cfg.model.num_points
    assert (model.criterion.oversample_ratio, model.criterion.importance_sample_ratio) == \
        (cfg.model.oversample_ratio, cfg.model.importance_sample_ratio)
    assert model.criterion.num_classes == cfg.data.num_classes and model.criterion.eos_coef == 0.1
    assert model.criterion.weight_dict["loss_mask_0"] == 5.0 and model.matcher.cost_class == 2.0


def test_synthetic_recipe_model_trains_a_step():
    cfg = load_config(path("synthetic"))
    assert (cfg.data.name, cfg.solver.max_iter, cfg.model.meta_architecture) == ("synthetic", 300, "mask2former")
    torch.manual_seed(0)
    model = build_model(cfg)
    size = 64  # the recipe's model at a smaller image than its data (128): any multiple of 32 will do
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, : size // 2], masks[1, size // 2:] = True, True
    targets = [{"labels": torch.tensor([1, 3]), "masks": masks}]
    losses = model.loss(model(torch.rand(1, 3, size, size)), targets)
    assert len(losses) == 3 * (cfg.model.dec_layers + 1) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.mask_embed.layers[-1].weight.grad.abs().sum() > 0


def test_maskformer_refuses_mask2former_fields():
    with pytest.raises(ConfigError, match="model.num_points: MaskFormer has no such option"):
        build_model(load_config(None, ["model.num_points=100"]))
    with pytest.raises(ConfigError, match="model.enc_n_points: MaskFormer has no such option"):
        build_model(load_config(None, ["model.enc_n_points=2"]))
