"""What every model of the MaskFormer family shares: image checks, normalization and padding,
``predict()`` with the post-processing, loss weighting, the ``fused`` switch and loading.

A subclass builds ``backbone`` (here), then its pixel decoder, transformer decoder and ``head``, then
calls :meth:`MaskClassificationModel._set_loss` with its matcher and criterion, and implements
``_forward_normalized(x, aux)``: normalized images -> the outputs dict.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import inference
from ..ops._checks import FLOAT_DTYPES, check_tensor
from .backbone import Backbone

TASKS = ("semantic", "panoptic", "instance")
Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def loss_weights(class_weight: float, mask_weight: float, dice_weight: float, aux_layers: int) -> Dict[str, float]:
    """The official weight_dict: the three loss weights, repeated for each aux layer's ``_i`` keys."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    for i in range(aux_layers):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


class MaskClassificationModel(nn.Module):
    """The shared base of :class:`MaskFormer` and :class:`Mask2Former` (see their docstrings for the
    arguments; these are the ones every model of the family takes)."""

    def __init__(self, num_classes: int, backbone: str, pretrained: Optional[str], pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], size_divisibility: int, object_mask_threshold: float,
                 overlap_threshold: float, test_topk_per_image: int, thing_classes: Optional[Collection[int]]):
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean, pixel_std: expected 3 values (RGB) each, got {len(pixel_mean)} and "
                             f"{len(pixel_std)}")
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.test_topk_per_image = test_topk_per_image
        self.thing_classes = None if thing_classes is None else tuple(sorted(int(c) for c in thing_classes))
        self.backbone = Backbone(backbone, pretrained)
        # Not persistent: they are arguments, not weights, and never appear in the state_dict.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    def _set_loss(self, matcher: nn.Module, criterion: nn.Module, fused: bool) -> None:
        """Registers the matcher and the criterion last (the state_dict ends with the criterion's
        buffer, as it always has) and sets ``fused`` on the model and both."""
        self.matcher = matcher
        self.criterion = criterion
        self.fused = fused

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """A model of this class with the weights of a checkpoint (see ``fastmaskformer.convert``)."""
        from ..convert import from_pretrained
        return from_pretrained(path, model_class=cls, **overrides)

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        """Switches the model's ops, the matcher and the criterion together."""
        self._fused = bool(value)
        self.matcher.fused = self._fused
        self.criterion.fused = self._fused

    def forward(self, images: torch.Tensor) -> Dict:
        """images: float [B, 3, H, W] RGB in [0, 1], H and W multiples of ``size_divisibility`` ->
        {"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H/4, W/4], "aux_outputs" (deep supervision)}."""
        self._check_image("images", images, 4)
        H, W = images.shape[-2:]
        d = self.size_divisibility
        if H % d or W % d:
            raise ValueError(f"images: expected H and W multiples of size_divisibility={d}, got {H}x{W}; pad them "
                             f"(predict() pads by itself)")
        return self._forward_normalized(self._normalize(images))

    def _forward_normalized(self, x: torch.Tensor, aux: bool = True) -> Dict:
        raise NotImplementedError

    def compile_training(self, **kwargs) -> "MaskClassificationModel":
        """``torch.compile`` the two traceable parts of a training step, in place: the forward and the
        criterion's losses given the matching (``SetCriterion.losses_from_matches``). The matcher
        stays eager: its linear assignment runs on the host (the graph would break there anyway).
        ``kwargs`` go to ``torch.compile``. Returns the model."""
        self.compile(**kwargs)
        self.criterion.losses_from_matches = torch.compile(self.criterion.losses_from_matches, **kwargs)
        return self

    def loss(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """The criterion's losses times their ``weight_dict`` weights (losses without a weight are dropped)."""
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in self.criterion(outputs, targets).items() if k in weights}

    @torch.no_grad()
    def predict(self, images: Images, task: str = "semantic") -> List[Dict]:
        """Post-processed predictions in eval mode, one dict per image, at each image's own size.

        images: float [B, 3, H, W] in [0, 1], or a list of [3, H_i, W_i]; any size (padded here).
        task: "semantic" -> {"sem_seg": [K, H, W] scores}; "panoptic" -> {"panoptic_seg": (int32
        [H, W] segment ids, segments_info)}; "instance" -> {"scores", "labels", "masks" bool [n, H, W]}.
        """
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        images = self._image_list(images)
        if not images:
            return []
        batch, sizes = self._normalize_and_pad(images)
        was_training = self.training
        self.eval()
        try:
            outputs = self._forward_normalized(batch, aux=False)  # the aux layers' masks are never computed
        finally:
            self.train(was_training)
        padded = tuple(batch.shape[-2:])
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if task == "semantic":
            # One op call for the batch at the padded size, then each image's crop (a view).
            scores = inference.semantic_inference(logits, masks, padded, fused=self.fused)
            return [{"sem_seg": s[:, :h, :w]} for s, (h, w) in zip(scores, sizes)]
        return [self._postprocess(task, c, m, padded, size) for c, m, size in zip(logits, masks, sizes)]

    def _postprocess(self, task: str, logits: torch.Tensor, masks: torch.Tensor, padded: Tuple[int, int],
                     size: Tuple[int, int]) -> Dict:
        """One image's outputs at stride 4 -> its panoptic or instance result: masks are upsampled to the
        padded input size, then the padding is cropped away (the official order)."""
        h, w = size
        masks = F.interpolate(masks[None].float(), size=padded, mode="bilinear", align_corners=False)[0, :, :h, :w]
        if task == "panoptic":
            return {"panoptic_seg": inference.panoptic_inference(logits, masks, self.object_mask_threshold,
                                                                 self.overlap_threshold, self.thing_classes)}
        return inference.instance_inference(logits, masks, self.test_topk_per_image, self.thing_classes)

    def _check_image(self, name: str, image, ndim: int) -> None:
        check_tensor(name, image, ndim, FLOAT_DTYPES)
        if image.shape[-3] != 3:
            raise ValueError(f"{name}: expected 3 (RGB) channels in dim {ndim - 3}, got shape {tuple(image.shape)}")
        if image.device != self.pixel_mean.device:
            raise ValueError(f"{name} is on {image.device} but the model is on {self.pixel_mean.device}")

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def _image_list(self, images: Images) -> List[torch.Tensor]:
        """A [B, 3, H, W] batch or a list of [3, H_i, W_i] images as a checked list of images."""
        if isinstance(images, torch.Tensor):
            self._check_image("images", images, 4)
            return list(images)
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images: expected a [B, 3, H, W] tensor or a list of [3, H, W] tensors, "
                            f"got {type(images).__name__}")
        for i, image in enumerate(images):
            self._check_image(f"images[{i}]", image, 3)
        return list(images)

    def _normalize_and_pad(self, images: List[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalized images zero-padded (bottom/right) to one size divisible by ``size_divisibility``:
        padding is 0 after normalization, i.e. the mean colour, as in the official ImageList."""
        sizes = [tuple(image.shape[-2:]) for image in images]
        d = self.size_divisibility
        H, W = (-(-max(s[j] for s in sizes) // d) * d for j in (0, 1))
        batch = self.pixel_mean.new_zeros((len(images), 3, H, W))
        for out, image, (h, w) in zip(batch, images, sizes):
            out[:, :h, :w] = self._normalize(image)
        return batch, sizes
