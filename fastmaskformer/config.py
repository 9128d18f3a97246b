"""Typed training configuration: four dataclasses loaded from YAML and overridden from the command line.

A config file has up to four sections (``model``, ``data``, ``solver``, ``train``); every key must
name a field below and hold a value of that field's type, otherwise :class:`ConfigError` names the
key, the expected type and the value it got. Command-line overrides are ``section.field=value``
pairs whose values are parsed as YAML (``solver.max_iter=100``, ``model.fused=true``,
``data.crop_size=[256,512]``). The dataclass defaults are the CPU-sized synthetic recipe, the same
as ``configs/synthetic.yaml``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Tuple

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic.yaml")


class UserError(Exception):
    """An error in what the user gave (config, dataset files, checkpoints), not in the code: the
    command-line tools print its message alone, without a traceback."""


class ConfigError(UserError, ValueError):
    """A config key that does not exist or a value of the wrong type."""


@dataclass
class ModelConfig:
    """The model class and its arguments (``num_classes`` comes from the data); see
    ``fastmaskformer.engine.build``."""

    meta_architecture: Literal["maskformer", "mask2former"] = "maskformer"
    """Model class: "maskformer" (fastmaskformer.MaskFormer) or "mask2former" (fastmaskformer.Mask2Former)."""
    backbone: str = "resnet18"
    """Backbone: "resnet18", "resnet50", "resnet101" or "swin_tiny" (see fastmaskformer.modeling.backbone)."""
    pretrained: Optional[str] = None
    """Backbone weights: a local .pth/.safetensors state dict of the timm model, or None (random init)."""
    num_queries: int = 20
    """Number of object queries (official: 100)."""
    hidden_dim: int = 128
    """Transformer decoder width (official: 256)."""
    mask_dim: int = 128
    """Channels of the per-pixel mask embeddings (official: 256)."""
    nheads: int = 4
    """Attention heads in the transformer decoder (official: 8)."""
    dim_feedforward: int = 512
    """Hidden size of the decoder's feed-forward layers (official: 2048)."""
    dec_layers: int = 3
    """Transformer decoder layers; deep supervision adds a loss after each (official: 6; Mask2Former: 9)."""
    enc_layers: int = 0
    """Transformer encoder layers in the pixel decoder ("transformer_encoder" decoder only; COCO: 6); Mask2Former:
    deformable-attention encoder layers, at least 1 (official: 6)."""
    enc_nheads: int = 8
    """Mask2Former: attention heads of the deformable encoder layers (official: 8)."""
    enc_n_points: int = 4
    """Mask2Former: sampling points per head and level of the deformable encoder layers (official: 4)."""
    enc_dim_feedforward: int = 1024
    """Mask2Former: FFN width of the deformable encoder layers (official: 1024)."""
    dropout: float = 0.0
    """Dropout in the transformer (official: 0.1)."""
    conv_dim: int = 128
    """Channels of the pixel decoder's FPN (official: 256)."""
    pixel_decoder: Literal["base", "transformer_encoder"] = "base"
    """Pixel decoder: the FPN ("base") or the FPN with a transformer encoder on res5 (COCO panoptic)."""
    deep_supervision: bool = True
    """Add the loss of every intermediate decoder layer."""
    class_weight: float = 1.0
    """Weight of the classification loss and matching cost."""
    mask_weight: float = 20.0
    """Weight of the mask loss and matching cost: sigmoid focal (MaskFormer), point BCE (Mask2Former: 5)."""
    dice_weight: float = 1.0
    """Weight of the dice loss and matching cost."""
    no_object_weight: float = 0.1
    """Cross-entropy weight of the "no object" class."""
    num_points: int = 12544
    """Mask2Former: points per mask at which the matcher and the loss compare masks (official: 112 x 112)."""
    oversample_ratio: float = 3.0
    """Mask2Former: the loss draws this many times num_points uniform candidates per mask (official: 3)."""
    importance_sample_ratio: float = 0.75
    """Mask2Former: fraction of the loss's points taken where the prediction is most uncertain (official: 0.75)."""
    mask_sampling: str = "points"
    """Mask2Former: "points" (official: BCE + dice on sampled points) or "full" (the exact full-resolution
    BCE + dice through the fused mask loss, no sampling)."""
    size_divisibility: int = 32
    """The model pads its input to a multiple of this."""
    object_mask_threshold: float = 0.8
    """Panoptic inference: minimum class score of a kept query."""
    overlap_threshold: float = 0.8
    """Panoptic inference: minimum visible fraction of a kept query's mask."""
    test_topk_per_image: int = 100
    """Instance inference: detections kept per image."""
    fused: bool = False
    """Use the fused Triton / C++ / CUDA kernels (``--fused``) instead of the reference PyTorch ops."""


@dataclass
class DataConfig:
    """Which dataset to read and how to augment it."""

    name: Literal["synthetic", "ade20k", "coco_panoptic", "coco_instance", "cityscapes"] = "synthetic"
    """Dataset name (see ``fastmaskformer.data.build_dataset``)."""
    root: str = "datasets"
    """Directory holding the dataset (ignored by "synthetic")."""
    task: Literal["semantic", "panoptic", "instance"] = "semantic"
    """What is trained and evaluated: mIoU on semantic masks, PQ on panoptic segments, or mask AP on instances."""
    num_classes: int = 8
    """Number of categories, without "no object" (ADE20K 150, COCO panoptic 133, COCO 80, Cityscapes 19)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for validation."""
    crop_size: Tuple[int, int] = (512, 512)
    """Training crop (height, width)."""
    base_size: int = 0
    """Training: the shorter side is resized to base_size times a random scale (0: the crop's longer side)."""
    min_scale: float = 0.5
    """Smallest random scale of the shorter side (official: 0.5, 0.6, ..., 2.0 times base_size)."""
    max_scale: float = 2.0
    """Largest random scale of the shorter side."""
    train_max_size: int = 0
    """Training: cap on the longer side after the random resize (0: 4 x base_size)."""
    max_single_class_ratio: float = 0.75
    """Re-draw a crop (up to 10 times) while one class covers more than this fraction of it."""
    flip: bool = True
    """Random horizontal flips."""
    color_jitter: bool = True
    """Photometric distortion (brightness, contrast, saturation, hue) as in the official recipe."""
    test_size: int = 512
    """Validation images are resized so that their shorter side is this (0 keeps the size)."""
    test_max_size: int = 2048
    """Cap on the longer side of a resized validation image."""
    ignore_label: int = 255
    """Label of pixels that count neither in the loss nor in the metrics."""
    size_divisibility: int = 32
    """Batches are zero-padded to a multiple of this."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    image_size: int = 128
    """Synthetic data: side of the square images."""
    train_length: int = 100000
    """Synthetic data: number of distinct training images."""
    val_length: int = 64
    """Synthetic data: number of validation images."""
    seed: int = 0
    """Synthetic data: the seed that, with the index, determines each image."""


@dataclass
class SolverConfig:
    """Optimizer, learning-rate schedule, clipping and mixed precision."""

    lr: float = 4e-4
    """Base learning rate of AdamW (official: 1e-4)."""
    weight_decay: float = 1e-4
    """AdamW weight decay of every parameter but norms and embeddings."""
    weight_decay_norm: float = 0.0
    """Weight decay of normalization layers' parameters (official: 0)."""
    weight_decay_embed: float = 0.0
    """Weight decay of embeddings (the query embeddings) and Swin position tables (official: 0)."""
    backbone_multiplier: float = 1.0
    """The backbone's learning rate is ``lr`` times this (official: 0.1, for a pretrained backbone)."""
    lr_scheduler: Literal["poly", "step"] = "poly"
    """"poly": lr * (1 - iter / max_iter) ** poly_power; "step": lr * gamma ** (milestones passed)."""
    poly_power: float = 0.9
    """Exponent of the poly schedule."""
    steps: Tuple[int, ...] = ()
    """Milestone iterations of the step schedule."""
    gamma: float = 0.1
    """Factor applied at every step milestone."""
    warmup_iters: int = 0
    """Iterations of linear warm-up from ``warmup_factor * lr``."""
    warmup_factor: float = 1.0
    """Starting fraction of the learning rate during warm-up."""
    max_iter: int = 300
    """Training iterations (one optimizer step each)."""
    clip_grad: float = 0.01
    """Clip the L2 norm of all gradients together (the whole model) to this; 0 disables."""
    batch_size: int = 8
    """Images per step over all processes (divided evenly among the ranks)."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler (CUDA only)."""


@dataclass
class TrainConfig:
    """Where outputs go, how often to checkpoint / evaluate / log, and reproducibility."""

    output_dir: str = "outputs/synthetic"
    """Directory of checkpoints, metrics.jsonl, config.yaml, TensorBoard events and the result PNG."""
    checkpoint_period: int = 100
    """Write a checkpoint every this many iterations (and always at the end)."""
    keep_last: int = 2
    """Number of periodic checkpoints kept (older ones are deleted)."""
    eval_period: int = 0
    """Evaluate on the validation split every this many iterations (0: only at the end)."""
    log_period: int = 10
    """Write training metrics every this many iterations."""
    seed: int = 0
    """Seed of the model initialization, dropout and the data order."""
    deterministic: bool = False
    """Use deterministic algorithms only (slower; bit-exact reruns and resumes)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir, if there is one (``--resume``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to train on; "auto" picks CUDA when available."""
    num_threads: int = 0
    """CPU threads of torch (0: all cores)."""
    tensorboard: bool = False
    """Also write TensorBoard events (needs the tensorboard package)."""
    eval_batch_size: int = 1
    """Images per validation batch on each process."""
    vis_images: int = 4
    """Validation images shown in the final image | ground truth | prediction PNG (0: no PNG)."""
    find_unused_parameters: bool = False
    """Passed to DistributedDataParallel."""
    compile: bool = False
    """torch.compile the model's forward and the criterion's losses (the matcher's host solver stays
    eager); the first steps pay for compilation."""
    compile_backend: str = "inductor"
    """The torch.compile backend for train.compile ("aot_eager" traces without generating code)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} x {_type_name(args[0])}" if len(set(args)) == 1 else \
            "list [" + ", ".join(_type_name(a) for a in args) + "]"
    return "None" if tp is type(None) else tp.__name__


def _convert(key: str, value, tp):
    """``value`` checked against the annotation ``tp`` (lists become tuples where ``tp`` is a tuple)."""
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _convert(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise bad
            return tuple(_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads exponents without a dot ("1e-4") as strings.
        try:
            return float(value)
        except ValueError:
            raise bad from None
    # bool is a subclass of int: "true" must not pass as an int, nor 1 as a bool.
    if isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool):
        return value
    raise bad


def _section_types(section) -> dict:
    return typing.get_type_hints(type(section))


def _set(cfg: Config, dotted: str, value) -> None:
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"{dotted}: unknown key (expected <section>.<field> with section in {sorted(sections)})")
    section = getattr(cfg, parts[0])
    types = _section_types(section)
    if parts[1] not in types:
        raise ConfigError(f"{dotted}: unknown key (fields of {parts[0]}: {', '.join(sorted(types))})")
    setattr(section, parts[1], _convert(dotted, value, types[parts[1]]))


def _validate(cfg: Config) -> None:
    """Cross-field rules that a single type cannot express."""
    checks = [
        ("solver.max_iter", cfg.solver.max_iter >= 1, "at least 1"),
        ("solver.batch_size", cfg.solver.batch_size >= 1, "at least 1"),
        ("solver.lr", cfg.solver.lr > 0, "positive"),
        ("solver.clip_grad", cfg.solver.clip_grad >= 0, "non-negative"),
        ("train.checkpoint_period", cfg.train.checkpoint_period >= 1, "at least 1"),
        ("train.keep_last", cfg.train.keep_last >= 1, "at least 1"),
        ("train.log_period", cfg.train.log_period >= 1, "at least 1"),
        ("train.eval_period", cfg.train.eval_period >= 0, "non-negative"),
        ("data.num_classes", cfg.data.num_classes >= 1, "at least 1"),
        ("data.size_divisibility", cfg.data.size_divisibility >= 1, "at least 1"),
        ("data.min_scale", 0 < cfg.data.min_scale <= cfg.data.max_scale, "positive and <= data.max_scale"),
    ]
    for key, ok, what in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: expected {what}, got {getattr(getattr(cfg, section), name)!r}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The config of YAML file ``path`` (default: configs/synthetic.yaml, or the dataclass defaults
    when that file is absent) with ``key=value`` overrides applied in order."""
    cfg = Config()
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(doc).__name__}")
        for section, values in doc.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of fields, got {values!r}")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: expected an override of the form key=value")
        _set(cfg, key.strip(), yaml.safe_load(text) if text.strip() else "")
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
            for s in (f.name for f in dataclasses.fields(Config))}


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmaskformer.train", description="Train MaskFormer.")
    p.add_argument("--config", default=None, help="YAML config (default: configs/synthetic.yaml)")
    p.add_argument("--fused", action="store_true", help="use the fused kernels (same as model.fused=true)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors in the input too "
                                                        "(same as FASTMASKFORMER_DEBUG=1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. solver.max_iter=100 model.fused=true")
    return p


def parse_args(argv: Optional[List[str]] = None) -> Config:
    """The config described by command-line arguments; a bad key or value exits with its message."""
    parser = argument_parser()
    return config_from_args(parser, parser.parse_args(argv))


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The config of parsed training arguments; a bad key or value or a missing file exits through
    ``parser.error`` (the message and usage, status 2)."""
    extra = (["model.fused=true"] if args.fused else []) + (["train.resume=true"] if args.resume else [])
    try:
        return load_config(args.config, list(args.overrides) + extra)
    except (ConfigError, OSError) as e:
        parser.error(str(e))
