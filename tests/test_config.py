"""Config loading: YAML files, key=value overrides, command-line flags, and errors that name the key."""
import dataclasses
import glob
import inspect
import os

import pytest

from fastmaskformer import config as C
from fastmaskformer.config import Config, ConfigError, load_config, parse_args

CONFIGS = sorted(glob.glob(os.path.join(C.REPO_ROOT, "configs", "*.yaml")))


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_default_is_the_synthetic_recipe_and_equals_the_dataclass_defaults(monkeypatch):
    from_file = load_config()
    assert from_file.data.name == "synthetic"
    monkeypatch.setattr(C, "DEFAULT_CONFIG", "/nonexistent/synthetic.yaml")
    assert load_config() == Config() == from_file


def test_every_field_has_a_docstring():
    for section in (C.ModelConfig, C.DataConfig, C.SolverConfig, C.TrainConfig):
        source = inspect.getsource(section)
        for f in dataclasses.fields(section):
            after = source.split(f"\n    {f.name}: ", 1)[1].split("\n")[1].strip()
            assert after.startswith('"""'), f"{section.__name__}.{f.name} has no docstring"


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(None, ["solver.max_iter=7", "model.fused=true", "solver.lr=3e-4", "solver.clip_grad=1",
                             "data.crop_size=[256, 512]", "model.pretrained=null", "solver.steps=[5, 9]",
                             "solver.amp=bf16", "train.output_dir=/tmp/x"])
    assert cfg.solver.max_iter == 7 and cfg.model.fused is True
    assert cfg.solver.lr == 3e-4 and isinstance(cfg.solver.clip_grad, float) and cfg.solver.clip_grad == 1.0
    assert cfg.data.crop_size == (256, 512) and cfg.solver.steps == (5, 9)
    assert cfg.model.pretrained is None and cfg.solver.amp == "bf16" and cfg.train.output_dir == "/tmp/x"


def test_overrides_apply_after_the_file_and_in_order(tmp_path):
    path = _write(tmp_path, "solver:\n  max_iter: 50\n  batch_size: 4\nmodel:\n  backbone: resnet50\n")
    cfg = load_config(path, ["solver.max_iter=60", "solver.max_iter=70"])
    assert (cfg.solver.max_iter, cfg.solver.batch_size, cfg.model.backbone) == (70, 4, "resnet50")
    assert cfg.solver.lr == Config().solver.lr  # untouched fields keep their defaults


@pytest.mark.parametrize("override, words", [
    ("solver.max_itr=5", ["solver.max_itr", "unknown key", "max_iter"]),
    ("optim.lr=1", ["optim.lr", "unknown key", "solver"]),
    ("max_iter=5", ["max_iter", "unknown key"]),
    ("solver.max_iter=1.5", ["solver.max_iter", "expected int", "1.5"]),
    ("solver.max_iter=true", ["solver.max_iter", "expected int", "True"]),
    ("model.fused=1", ["model.fused", "expected bool", "1"]),
    ("solver.lr=fast", ["solver.lr", "expected float", "'fast'"]),
    ("solver.amp=fp32", ["solver.amp", "'none' | 'bf16' | 'fp16'", "'fp32'"]),
    ("data.crop_size=512", ["data.crop_size", "list of 2 x int", "512"]),
    ("data.crop_size=[512, 1.5]", ["data.crop_size[1]", "expected int", "1.5"]),
    ("model.backbone=3", ["model.backbone", "expected str", "3"]),
    ("solver.max_iter", ["solver.max_iter", "key=value"]),
    ("solver.max_iter=0", ["solver.max_iter", "at least 1", "0"]),
])
def test_bad_overrides_name_the_key_the_expected_type_and_the_value(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("text, words", [
    ("solver:\n  lr: 1.0e-4\n  momentum: 0.9\n", ["solver.momentum", "unknown key"]),
    ("trainer:\n  seed: 1\n", ["trainer.seed", "unknown key"]),
    ("data:\n  num_workers: two\n", ["data.num_workers", "expected int", "'two'"]),
    ("data: 5\n", ["data", "mapping"]),
    ("- 1\n- 2\n", ["mapping"]),
])
def test_bad_files_name_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_flags_and_overrides_on_the_command_line(tmp_path):
    path = _write(tmp_path, "train:\n  output_dir: runs/a\n")
    cfg = parse_args(["--config", path, "--fused", "--resume", "solver.max_iter=3"])
    assert cfg.model.fused and cfg.train.resume and cfg.solver.max_iter == 3 and cfg.train.output_dir == "runs/a"
    plain = parse_args([])
    assert not plain.model.fused and not plain.train.resume


def test_command_line_errors_exit_with_the_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["solver.nope=1"])
    assert e.value.code == 2 and "solver.nope: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--config", "/nonexistent.yaml"])


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["data.crop_size=[96, 128]", "solver.steps=[3]", "model.pretrained=w.pth"])
    C.save_config(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.solver.max_iter >= 1 and cfg.data.num_classes >= 1


def test_official_recipes():
    ade = load_config(os.path.join(C.REPO_ROOT, "configs", "ade20k_r50.yaml"))
    s = ade.solver
    assert (s.lr, s.weight_decay, s.backbone_multiplier, s.lr_scheduler, s.poly_power) == (1e-4, 1e-4, 0.1, "poly", 0.9)
    assert (s.clip_grad, s.batch_size, s.max_iter) == (0.01, 16, 160000)
    assert (ade.data.num_classes, ade.data.crop_size, ade.model.num_queries, ade.model.dec_layers) == \
        (150, (512, 512), 100, 6)
    swin = load_config(os.path.join(C.REPO_ROOT, "configs", "ade20k_swin_t.yaml")).solver
    assert (swin.lr, swin.weight_decay, swin.backbone_multiplier, swin.warmup_iters) == (6e-5, 0.01, 1.0, 1500)
    coco = load_config(os.path.join(C.REPO_ROOT, "configs", "coco_panoptic_r50.yaml"))
    assert (coco.data.num_classes, coco.data.task, coco.model.pixel_decoder, coco.model.enc_layers) == \
        (133, "panoptic", "transformer_encoder", 6)
    assert (coco.solver.batch_size, coco.solver.max_iter, coco.solver.lr_scheduler, coco.solver.steps) == \
        (64, 554400, "step", (369600,))
    city = load_config(os.path.join(C.REPO_ROOT, "configs", "cityscapes_r50.yaml"))
    assert (city.data.num_classes, city.data.crop_size, city.solver.max_iter) == (19, (512, 1024), 90000)
