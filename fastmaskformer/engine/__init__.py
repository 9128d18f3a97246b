"""The training engine: model building, loop, evaluation loop, optimizer and schedule, checkpoints,
distributed setup, data loading, metrics and pictures. ``train(cfg)`` is what
``python -m fastmaskformer.train`` runs."""
from __future__ import annotations

from typing import Dict

from .build import build_model
from .distributed import cleanup
from .evaluator import run_evaluation
from .trainer import Trainer


def train(cfg) -> Dict:
    """Train (resuming if ``cfg.train.resume``), evaluate and return the validation metrics."""
    try:
        return Trainer(cfg).train()
    finally:
        cleanup()


__all__ = ["Trainer", "build_model", "run_evaluation", "train"]
