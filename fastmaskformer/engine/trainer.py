"""The training loop: one optimizer step per iteration, periodic logging, checkpoints and evaluation,
then a final validation, checkpoint and prediction picture.

A resumed run continues exactly where the checkpoint left off: the checkpoint holds the model,
optimizer, scheduler, gradient scaler, iteration, every rank's random states and the data
position, and the data order and augmentation are functions of (seed, epoch, index) only (see
``engine.data``). Evaluation and the picture run with the random streams saved and restored, so
whether or not they ran does not change the training that follows.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from typing import Dict, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import Config, ConfigError, save_config, to_dict
from ..data import build_dataset
from . import checkpoint as ckpt
from .build import build_model
from .data import TrainBatches, val_loader
from .distributed import all_gather_object, barrier, broadcast_object, init_distributed
from .evaluator import run_evaluation
from .metrics import MetricsWriter
from .optim import build_optimizer, build_scheduler
from .visualize import save_comparison

FINAL_WEIGHTS = "model_final.pth"
PREDICTIONS_PNG = "predictions.png"


def _configure_runtime(cfg: Config, rank: int) -> None:
    """Threads, determinism and seeds, before anything random or parallel happens."""
    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    if cfg.train.deterministic:
        # warn_only: a few CUDA backward kernels (e.g. bilinear upsampling) have no deterministic
        # version; they warn instead of stopping the run. Every CPU kernel is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    seed = cfg.train.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything a run needs from a :class:`fastmaskformer.config.Config`; :meth:`train` runs it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace for reproducible results; it reads this when CUDA initializes.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dist, self.device = init_distributed(cfg.train.device)
        if cfg.solver.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("solver.amp: 'fp16' needs a CUDA device (gradient scaling); use 'bf16' or 'none' on "
                              f"{self.device.type}")
        if cfg.solver.batch_size % self.dist.world_size:
            raise ConfigError(f"solver.batch_size: expected a multiple of the {self.dist.world_size} processes, got "
                              f"{cfg.solver.batch_size}")
        _configure_runtime(cfg, self.dist.rank)

        self.train_set = build_dataset(cfg.data, cfg.data.train_split)
        self.val_set = build_dataset(cfg.data, cfg.data.val_split)
        have = getattr(self.train_set, "num_classes", cfg.data.num_classes)
        if have != cfg.data.num_classes:
            raise ConfigError(f"data.num_classes: the {cfg.data.name} dataset has {have} classes, got "
                              f"{cfg.data.num_classes}")
        self.thing_classes = getattr(self.train_set, "thing_classes", None)

        self.model = build_model(cfg, self.thing_classes).to(self.device)
        if cfg.train.compile:
            self.model.compile_training(backend=cfg.train.compile_backend)
        self.net = self.model
        if self.dist.distributed:
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.solver.amp == "fp16")

        world, rank = self.dist.world_size, self.dist.rank
        self.batches = TrainBatches(self.train_set, cfg.solver.batch_size // world, rank, world, cfg.train.seed,
                                    cfg.data.num_workers, cfg.data.size_divisibility, cfg.data.ignore_label,
                                    pin_memory=self.device.type == "cuda")
        self.val_loader = val_loader(self.val_set, cfg.train.eval_batch_size, rank, world, cfg.data.num_workers,
                                     cfg.data.size_divisibility, cfg.data.ignore_label)
        self.iteration = 0
        self.output_dir = cfg.train.output_dir
        if self.dist.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.output_dir, "config.yaml"))
        self.metrics = MetricsWriter(self.output_dir, self.dist.is_main, cfg.train.tensorboard)
        if cfg.train.resume:
            self.resume()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        epoch, start = self.batches.position(self.iteration)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "rng": all_gather_object(ckpt.rng_state()),  # one entry per rank
            "data_position": {"epoch": epoch, "start": start, "world_size": self.dist.world_size,
                              "batch_size": self.batches.batch_size},
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: Dict, path: str = "checkpoint") -> None:
        ckpt.load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        pos = state["data_position"]
        if (pos["world_size"], pos["batch_size"]) != (self.dist.world_size, self.batches.batch_size):
            warnings.warn(f"resuming with {self.dist.world_size} processes x {self.batches.batch_size} images instead "
                          f"of {pos['world_size']} x {pos['batch_size']}: the data order and random streams will "
                          "differ from an uninterrupted run")
        else:
            ckpt.set_rng_state(state["rng"][self.dist.rank])

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # a collective (gathers the RNG states): every rank calls it
        if self.dist.is_main:
            ckpt.save_atomic(state, ckpt.checkpoint_path(self.output_dir, self.iteration))
            ckpt.prune(self.output_dir, self.cfg.train.keep_last)
        barrier()

    def resume(self) -> bool:
        """Load the newest checkpoint in output_dir that loads (the main process picks it, warning
        about newer ones it skips); False if there is none, CheckpointError if none loads."""
        found, error = None, None
        if self.dist.is_main:
            try:
                found = ckpt.load_newest(self.output_dir)
            except ckpt.CheckpointError as e:
                error = str(e)
        path, error = broadcast_object((found[0] if found else None, error))
        if error is not None:  # every rank stops with the same message
            raise ckpt.CheckpointError(error)
        if path is None:
            return False
        self.load_state_dict(found[1] if found else ckpt.load(path, ckpt.TRAINING_KEYS), path)
        if self.dist.is_main:
            tqdm.write(f"resumed from {path} at iteration {self.iteration}")
        return True

    # -- one step ------------------------------------------------------------------------------
    def _autocast(self):
        amp = self.cfg.solver.amp
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def step(self, batch: Dict) -> Dict[str, torch.Tensor]:
        """Forward, loss, backward, clip, optimizer and scheduler step; returns the weighted losses
        (with their sum as "loss") of this step, and "lr", "grad_norm"."""
        images = batch["images"].to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        with self._autocast():
            outputs = self.net(images)
            losses = self.model.loss(outputs, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at iteration {self.iteration}: "
                                     f"{ {k: v.item() for k, v in losses.items()} }")
        lr = max(g["lr"] for g in self.optimizer.param_groups)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        # Clipping the whole model's gradient norm (official "full_model" clipping); max_norm=inf
        # only measures it.
        clip = self.cfg.solver.clip_grad or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()},
                "lr": torch.tensor(lr), "grad_norm": grad_norm.detach()}

    # -- the loop ------------------------------------------------------------------------------
    def train(self, until: Optional[int] = None) -> Dict:
        """Train up to ``solver.max_iter`` and return the final validation metrics. ``until`` stops
        after that iteration instead (as a pre-empted job would), without the final steps; the
        returned dict is then empty."""
        cfg = self.cfg.train
        max_iter = self.cfg.solver.max_iter
        stop = max_iter if until is None else min(until, max_iter)
        self.model.train()
        bar = tqdm(total=max_iter, initial=self.iteration, desc="train", dynamic_ncols=True,
                   disable=not self.dist.is_main)
        batches = self.batches.from_iteration(self.iteration)
        tic, logged = time.perf_counter(), self.iteration
        try:
            while self.iteration < stop:
                stats = self.step(next(batches))
                self.iteration += 1
                bar.update(1)
                if self.iteration % cfg.log_period == 0 or self.iteration == stop:
                    row = {k: v.item() for k, v in stats.items() if not k[-1].isdigit()}  # aux layers: too many
                    row["time"] = (time.perf_counter() - tic) / (self.iteration - logged)  # seconds per iteration
                    tic, logged = time.perf_counter(), self.iteration
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
                    self.metrics.write(self.iteration, row)
                if self.iteration % cfg.checkpoint_period == 0 and self.iteration < max_iter:
                    self.save_checkpoint()
                if cfg.eval_period and self.iteration % cfg.eval_period == 0 and self.iteration < max_iter:
                    self.evaluate()
        finally:
            batches.close()
            bar.close()
        if self.iteration < max_iter:
            return {}
        self.save_checkpoint()
        if self.dist.is_main:
            ckpt.save_atomic({"model": self.model.state_dict(), "config": to_dict(self.cfg)},
                             os.path.join(self.output_dir, FINAL_WEIGHTS))
        results = self.evaluate()
        self.visualize()
        self.metrics.close()
        return results

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> Dict:
        """Validation metrics (mIoU ... or PQ ...) over all ranks' shards, logged with a "val/" prefix."""
        with ckpt.preserved_rng():
            results = run_evaluation(self.model, self.val_loader, task=self.cfg.data.task,
                                     num_classes=self.cfg.data.num_classes, ignore_label=self.cfg.data.ignore_label,
                                     thing_classes=self.thing_classes, progress=self.dist.is_main)
        scalars = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        self.metrics.write(self.iteration, scalars, prefix="val/")
        return results

    def visualize(self) -> Optional[str]:
        """Write image | ground truth | prediction rows for the first validation images (main process)."""
        n = min(self.cfg.train.vis_images, len(self.val_set))
        if not self.dist.is_main or n == 0:
            return None
        samples = [self.val_set[i] for i in range(n)]
        with ckpt.preserved_rng():
            preds = self.model.predict([s["image"].to(self.device) for s in samples], "semantic")
        path = os.path.join(self.output_dir, PREDICTIONS_PNG)
        save_comparison(path, [s["image"] for s in samples], [s["sem_seg"] for s in samples],
                        [p["sem_seg"].argmax(0) for p in preds], self.cfg.data.num_classes,
                        class_names=getattr(self.val_set, "class_names", None))
        return path
