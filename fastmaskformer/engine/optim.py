"""AdamW with the official MaskFormer parameter groups, and its warm-up + poly / step schedule.

Groups (as in the official training script): parameters of modules whose name contains
"backbone" get ``lr * backbone_multiplier``; normalization layers get ``weight_decay_norm`` and
embeddings (the query embeddings) plus Swin's position tables get ``weight_decay_embed``; every
other parameter gets ``weight_decay``. Parameters with equal settings share one group.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Tuple

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
              nn.LocalResponseNorm)
POSITION_TABLES = ("relative_position_bias_table", "absolute_pos_embed")


def param_groups(model: nn.Module, cfg) -> List[Dict]:
    """Parameter groups of ``model`` for a :class:`fastmaskformer.config.SolverConfig` ``cfg``."""
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            lr = cfg.lr * (cfg.backbone_multiplier if "backbone" in module_name else 1.0)
            wd = cfg.weight_decay
            if isinstance(module, NORM_TYPES):
                wd = cfg.weight_decay_norm
            elif isinstance(module, nn.Embedding) or any(t in name for t in POSITION_TABLES):
                wd = cfg.weight_decay_embed
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(it: int, cfg) -> float:
    """Multiplier of every group's base learning rate at iteration ``it`` (0-based)."""
    warm = 1.0
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.lr_scheduler == "poly":
        return warm * max(0.0, 1.0 - it / cfg.max_iter) ** cfg.poly_power
    return warm * cfg.gamma ** bisect.bisect_right(sorted(cfg.steps), it)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration, after the optimizer."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
