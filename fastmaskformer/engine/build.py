"""Config to model: the one place that turns a :class:`fastmaskformer.config.Config` into a model,
imported by the trainer and the evaluator alike.

``model.meta_architecture`` names the model class; every other field of the ``model`` section is a
keyword of that class's constructor. A field the chosen class does not take must keep its default,
so a recipe cannot set an option that would silently do nothing.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Collection, Optional

import torch

import fastmaskformer

from ..config import Config, ConfigError, ModelConfig

# meta_architecture -> the class's name in the fastmaskformer namespace
ARCHITECTURES = {"maskformer": "MaskFormer", "mask2former": "Mask2Former"}


def model_class(name: str) -> type:
    """The model class that ``model.meta_architecture = name`` selects."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"model.meta_architecture: expected one of {sorted(ARCHITECTURES)}, got {name!r}")
    cls = getattr(fastmaskformer, ARCHITECTURES[name], None)
    if cls is None:
        raise ConfigError(f"model.meta_architecture: {name!r} needs fastmaskformer.{ARCHITECTURES[name]}, which this "
                          f"version of fastmaskformer does not provide")
    return cls


def model_kwargs(cfg: Config, cls: type) -> dict:
    """The ``model`` section as keyword arguments of ``cls``; a non-default field ``cls`` does not
    accept raises ConfigError naming it."""
    accepted = inspect.signature(cls.__init__).parameters
    defaults = ModelConfig()
    kwargs = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name == "meta_architecture":
            continue
        value = getattr(cfg.model, f.name)
        value = list(value) if isinstance(value, tuple) else value
        if f.name in accepted:
            kwargs[f.name] = value
        elif getattr(defaults, f.name) != getattr(cfg.model, f.name):
            raise ConfigError(f"model.{f.name}: {cls.__name__} has no such option (model.meta_architecture="
                              f"{cfg.model.meta_architecture!r}), got {value!r}")
    return kwargs


def build_model(cfg: Config, thing_classes: Optional[Collection[int]] = None) -> torch.nn.Module:
    """The model that ``cfg.model`` describes, with ``cfg.data.num_classes`` classes; ``thing_classes``
    (the dataset's) drive panoptic and instance inference."""
    cls = model_class(cfg.model.meta_architecture)
    return cls(num_classes=cfg.data.num_classes, thing_classes=thing_classes, **model_kwargs(cfg, cls))
