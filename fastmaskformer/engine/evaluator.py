"""The evaluation loop: ``run_evaluation`` runs a model's ``predict`` over a loader and reduces the
metrics over ranks. Training evaluates with it, and so does ``python -m fastmaskformer.evaluate``."""
from __future__ import annotations

import json
import math
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..evaluation import InstanceEvaluator, PanopticEvaluator, SemSegEvaluator

TASKS = ("semantic", "panoptic", "instance")
# The official MaskFormer test-time augmentation: shortest edges 256..896 around the 512 test size.
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _crops(images: torch.Tensor, image_sizes: Sequence) -> list:
    """The images without the loader's padding: the model pads them itself, in normalized space."""
    return [img[:, :h, :w] for img, (h, w) in zip(images, image_sizes)]


def semantic_scores(model, images: torch.Tensor, image_sizes: Sequence, scales: Sequence[float] = (1.0,),
                    flip: bool = False) -> list:
    """Per image, class scores [K,h,w] at its unpadded size, averaged over ``scales`` (each view
    bilinearly resized, predicted, and resized back) and, with ``flip``, mirrored views."""
    sums = [None] * len(image_sizes)
    views = 0
    for scale in scales:
        for mirrored in ((False, True) if flip else (False,)):
            views += 1
            crops = []
            for img, (h, w) in zip(_crops(images, image_sizes), image_sizes):
                if scale != 1.0:
                    size = (max(1, round(h * scale)), max(1, round(w * scale)))
                    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
                crops.append(img.flip(-1) if mirrored else img)
            for i, (pred, (h, w)) in enumerate(zip(model.predict(crops, "semantic"), image_sizes)):
                s = pred["sem_seg"].float()
                s = s.flip(-1) if mirrored else s
                if s.shape[-2:] != (h, w):
                    s = F.interpolate(s[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                sums[i] = s if sums[i] is None else sums[i] + s
    return [s / views for s in sums]


@torch.no_grad()
def run_evaluation(model, loader, task: str = "semantic", num_classes: Optional[int] = None, ignore_label: int = 255,
                   thing_classes: Optional[Sequence[int]] = None, multi_scale: Optional[Sequence[float]] = None,
                   flip: bool = False, progress: bool = True, output_path: Optional[str] = None,
                   class_names: Optional[Sequence[str]] = None) -> Dict:
    """Run ``model.predict`` over ``loader`` (batches from fastmaskformer.data.collate) and return the
    metrics: mIoU, fwIoU, pixel_acc, mean_acc, per_class_iou for "semantic"; PQ/SQ/RQ (all, _th, _st)
    and per_class for "panoptic"; AP, AP50, AP75, APs, APm, APl and per_class (COCO mask AP against
    ``loader.dataset.coco``) for "instance". ``multi_scale`` (scales of the loaded size) and ``flip`` average
    semantic scores over views. Missing num_classes / thing_classes / class_names come from
    ``loader.dataset``. Rank 0 prints a table and, given ``output_path``, writes the metrics as JSON."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if task != "semantic" and (multi_scale or flip):
        raise ValueError("multi_scale/flip: test-time augmentation averages semantic scores; it is not "
                         f"defined for task={task!r}")
    dataset = getattr(loader, "dataset", None)
    num_classes = num_classes if num_classes is not None else getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise ValueError("num_classes: not given and loader.dataset has no num_classes attribute")
    class_names = class_names if class_names is not None else getattr(dataset, "class_names", None)
    if task == "semantic":
        evaluator = SemSegEvaluator(num_classes, ignore_label, class_names)
    elif task == "instance":
        evaluator = _instance_evaluator(dataset, num_classes, class_names)
    else:
        thing_classes = thing_classes if thing_classes is not None else getattr(dataset, "thing_classes", None)
        if thing_classes is None:
            raise ValueError("thing_classes: needed for task='panoptic' (not given and not on loader.dataset)")
        evaluator = PanopticEvaluator(num_classes, thing_classes, class_names)

    net = getattr(model, "module", model)  # unwrap DistributedDataParallel: predict is the model's own
    was_training = net.training
    net.eval()
    device = _model_device(net)
    batches = loader
    if progress and _is_main_process():
        batches = tqdm(loader, desc=f"eval {task}", dynamic_ncols=True)
    try:
        for batch in batches:
            images = batch["images"].to(device)
            sizes = [tuple(int(v) for v in s) for s in batch["image_sizes"]]
            if task == "semantic":
                scores = semantic_scores(net, images, sizes, multi_scale or (1.0,), flip)
                for s, gt, (h, w) in zip(scores, batch["sem_seg"], sizes):
                    evaluator.process(s.argmax(0).cpu(), gt[:h, :w].cpu())
            elif task == "instance":
                if "image_ids" not in batch:
                    raise ValueError("task='instance': the loader's batches carry no image_ids (is the dataset "
                                     "COCO instances?)")
                for pred, image_id in zip(net.predict(_crops(images, sizes), "instance"), batch["image_ids"]):
                    evaluator.process(image_id, pred["scores"], pred["labels"], pred["masks"])
            else:
                if "pan_seg" not in batch:
                    raise ValueError("task='panoptic': the loader's batches carry no pan_seg/segments (is the "
                                     "dataset panoptic?)")
                preds = net.predict(_crops(images, sizes), "panoptic")
                for pred, gt, segs, (h, w) in zip(preds, batch["pan_seg"], batch["segments"], sizes):
                    ids, infos = pred["panoptic_seg"]
                    evaluator.process(ids[:h, :w].cpu(), infos, gt[:h, :w].cpu(), segs)
    finally:
        net.train(was_training)

    metrics = evaluator.evaluate()
    if _is_main_process():
        print(format_table(metrics))
        if output_path is not None:
            write_json(metrics, output_path)
    return metrics


def _instance_evaluator(dataset, num_classes: int, class_names) -> InstanceEvaluator:
    """AP against the dataset's own JSON: its pycocotools index and contiguous -> COCO category ids."""
    coco, category_ids = getattr(dataset, "coco", None), getattr(dataset, "category_ids", None)
    if coco is None or category_ids is None:
        raise ValueError("task='instance': loader.dataset must carry the ground truth as a pycocotools index "
                         "(.coco) and .category_ids, as COCOInstanceDataset does")
    if len(category_ids) != num_classes:
        raise ValueError(f"num_classes: the dataset has {len(category_ids)} categories, got {num_classes}")
    return InstanceEvaluator(coco, category_ids, class_names)


def _fmt(v: float) -> str:
    return "   nan" if v is None or math.isnan(v) else f"{v:6.2f}"


def format_table(metrics: Dict) -> str:
    """A plain-text table: the summary line, then one line per class."""
    if "mIoU" in metrics:
        head = " | ".join(f"{k} {_fmt(metrics[k])}" for k in ("mIoU", "fwIoU", "pixel_acc", "mean_acc"))
        rows = [f"{name:<24} IoU {_fmt(v)}" for name, v in metrics["per_class_iou"].items()]
    elif "AP" in metrics:
        head = " | ".join(f"{k} {_fmt(metrics[k])}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
        rows = [f"{name:<24} AP {_fmt(v)}" for name, v in metrics["per_class"].items()]
    else:
        head = "\n".join(" | ".join(f"{k}{g} {_fmt(metrics[k + g])}" for k in ("PQ", "SQ", "RQ"))
                         for g in ("", "_th", "_st"))
        rows = [f"{name:<24} " + " ".join(f"{k} {_fmt(v[k])}" for k in ("PQ", "SQ", "RQ"))
                for name, v in metrics["per_class"].items()]
    return "\n".join([head, "-" * 40, *rows])


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return None if isinstance(v, float) and math.isnan(v) else v


def write_json(metrics: Dict, path: str) -> None:
    """Metrics as strict JSON (NaN, i.e. a class never seen, becomes null)."""
    with open(path, "w") as f:
        json.dump(_json_safe(metrics), f, indent=2, allow_nan=False)
