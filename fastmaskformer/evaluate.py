"""Evaluate a trained model on a config's validation split:

    python -m fastmaskformer.evaluate --config FILE --checkpoint CKPT [--task semantic|panoptic|instance]
        [--multi-scale] [--flip] [--output metrics.json] [--debug] [key=value ...]

The loop itself is ``fastmaskformer.engine.evaluator.run_evaluation`` (re-exported here); the model
comes from ``fastmaskformer.engine.build``, as in training. Errors in the input (dataset layout,
an unreadable checkpoint) print their message and exit with status 1; ``--debug`` or
FASTMASKFORMER_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Sequence

from .config import Config, ConfigError, load_config
from .data import build_dataset
from .engine import checkpoint
from .engine.build import build_model
from .engine.cli import user_errors
from .engine.data import val_loader
from .engine.distributed import cleanup, init_distributed
from .engine.evaluator import MULTI_SCALES, TASKS, format_table, run_evaluation, semantic_scores, write_json


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmaskformer.evaluate",
                                description="Evaluate a MaskFormer checkpoint on a config's validation split.")
    p.add_argument("--config", default=None, help="the YAML config the model was trained with "
                                                  "(default: configs/synthetic.yaml)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file holding the model's state dict under 'model'")
    p.add_argument("--task", choices=TASKS, default=None, help="default: the config's data.task")
    p.add_argument("--multi-scale", action="store_true",
                   help=f"average semantic scores over the scales {list(MULTI_SCALES)} of the test size")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped views (semantic)")
    p.add_argument("--output", default=None, help="metrics JSON (default: eval_<task>.json next to the checkpoint)")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors in the input too "
                                                        "(same as FASTMASKFORMER_DEBUG=1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=/data/ade")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, list(args.overrides))
    except (ConfigError, OSError) as e:
        parser.error(str(e))
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint: {args.checkpoint} does not exist")
    with user_errors(parser.prog, args.debug):
        return evaluate(cfg, args.checkpoint, args.task or cfg.data.task, args.multi_scale, args.flip, args.output)


def evaluate(cfg: Config, checkpoint_path: str, task: str, multi_scale: bool = False, flip: bool = False,
             output: Optional[str] = None) -> Dict:
    """Evaluate the model of ``cfg`` with the weights of ``checkpoint_path`` on the validation split."""
    info, device = init_distributed(cfg.train.device)
    try:
        dataset = build_dataset(cfg.data, cfg.data.val_split)
        model = build_model(cfg, getattr(dataset, "thing_classes", None))
        checkpoint.load_model_state(model, checkpoint.load(checkpoint_path, ("model",))["model"], checkpoint_path)
        loader = val_loader(dataset, cfg.train.eval_batch_size, info.rank, info.world_size, cfg.data.num_workers,
                            cfg.data.size_divisibility, cfg.data.ignore_label)
        output = output or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"eval_{task}.json")
        return run_evaluation(model.to(device), loader, task, num_classes=cfg.data.num_classes,
                              ignore_label=cfg.data.ignore_label,
                              multi_scale=MULTI_SCALES if multi_scale else None, flip=flip,
                              progress=info.is_main, output_path=output)
    finally:
        cleanup()


__all__ = ["evaluate", "format_table", "main", "run_evaluation", "semantic_scores", "write_json"]

if __name__ == "__main__":
    main()
