"""MaskFormer (Cheng et al., NeurIPS 2021): backbone -> pixel decoder -> transformer decoder -> heads,
with its matcher and criterion for training and post-processing for inference."""
from __future__ import annotations

from typing import Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import inference, ops
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..ops._checks import FLOAT_DTYPES, check_tensor
from .backbone import Backbone
from .heads import MaskClassificationHead
from .pixel_decoder import BasePixelDecoder, TransformerEncoderPixelDecoder
from .transformer_decoder import QueryDecoder

PIXEL_DECODERS = ("base", "transformer_encoder")
TASKS = ("semantic", "panoptic", "instance")
Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def loss_weights(class_weight: float, mask_weight: float, dice_weight: float, aux_layers: int) -> Dict[str, float]:
    """The official weight_dict: the three loss weights, repeated for each aux layer's ``_i`` keys."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    for i in range(aux_layers):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


class MaskFormer(nn.Module):
    """MaskFormer for semantic, panoptic and instance segmentation.

    Args:
        num_classes: K, the number of classes (the class head adds a "no object" class).
        backbone: a timm backbone name from ``fastmaskformer.modeling.BACKBONES`` (or an alias).
        num_queries: number of learned queries Q.
        hidden_dim: width of the transformer decoder.
        mask_dim: channels of the per-pixel and per-query mask embeddings.
        nheads: attention heads in every transformer layer.
        dim_feedforward: FFN width in every transformer layer.
        dec_layers: transformer decoder layers L.
        enc_layers: DETR encoder layers over the stride-32 features: inside the pixel decoder for
            ``pixel_decoder="transformer_encoder"`` (6 in the official COCO recipe), else in front of
            the transformer decoder (0 in every official recipe).
        dropout: dropout of every transformer layer.
        conv_dim: channels of the FPN in the pixel decoder (a multiple of 32).
        pixel_decoder: "base" (FPN) or "transformer_encoder" (FPN with an encoder on res5 whose
            output the transformer decoder reads).
        deep_supervision: predict (and train) on every decoder layer; adds "aux_outputs".
        class_weight: weight of the classification loss and matching cost.
        mask_weight: weight of the focal mask loss and matching cost.
        dice_weight: weight of the dice loss and matching cost.
        no_object_weight: cross-entropy weight of the "no object" class (eos_coef).
        pretrained: path of a local backbone state-dict file (.pth/.safetensors); None = random init.
        pixel_mean: per-channel RGB mean subtracted from images in [0, 1].
        pixel_std: per-channel RGB std images are divided by.
        size_divisibility: forward() needs H, W multiples of this; predict() pads to them.
        object_mask_threshold: panoptic inference keeps queries whose class probability exceeds it.
        overlap_threshold: panoptic inference drops queries that keep less than this fraction of
            their own mask after the per-pixel argmax.
        test_topk_per_image: instance inference keeps this many (query, class) pairs per image.
        thing_classes: ids of the thing classes (panoptic stuff merging, instance filtering);
            None means every class is a thing.
        fused: use the fused backends of ``fastmaskformer.ops`` in the model, matcher and criterion.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", num_queries: int = 100, hidden_dim: int = 256,
                 mask_dim: int = 256, nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 6,
                 enc_layers: int = 0, dropout: float = 0.1, conv_dim: int = 256, pixel_decoder: str = "base",
                 deep_supervision: bool = True, class_weight: float = 1.0, mask_weight: float = 20.0,
                 dice_weight: float = 1.0, no_object_weight: float = 0.1, pretrained: Optional[str] = None,
                 pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 pixel_std: Sequence[float] = (0.229, 0.224, 0.225), size_divisibility: int = 32,
                 object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, test_topk_per_image: int = 100,
                 thing_classes: Optional[Collection[int]] = None, fused: bool = False):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("num_queries", num_queries)
        _check_positive_int("size_divisibility", size_divisibility)
        if pixel_decoder not in PIXEL_DECODERS:
            raise ValueError(f"pixel_decoder: expected one of {PIXEL_DECODERS}, got {pixel_decoder!r}")
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
        if pixel_decoder == "transformer_encoder":
            self.pixel_decoder = TransformerEncoderPixelDecoder(self.backbone.feature_info, conv_dim, mask_dim,
                                                                enc_layers, nheads, dim_feedforward, dropout)
            decoder_enc_layers = 0
        else:
            self.pixel_decoder = BasePixelDecoder(self.backbone.feature_info, conv_dim, mask_dim)
            decoder_enc_layers = enc_layers
        self.transformer_decoder = QueryDecoder(self.pixel_decoder.transformer_in_channels, hidden_dim, num_queries,
                                                nheads, dim_feedforward, dec_layers, decoder_enc_layers, dropout)
        self.head = MaskClassificationHead(hidden_dim, num_classes, mask_dim, deep_supervision)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

        self.matcher = HungarianMatcher(cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight,
                                        fused=fused)
        weight_dict = loss_weights(class_weight, mask_weight, dice_weight, dec_layers - 1 if deep_supervision else 0)
        self.criterion = SetCriterion(num_classes, self.matcher, weight_dict, no_object_weight, ("labels", "masks"),
                                      fused=fused)
        self.fused = fused

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
        features = self.backbone(x)
        mask_features, transformer_input = self.pixel_decoder(features)
        hs = self.transformer_decoder(transformer_input)
        return self.head(hs, mask_features, backend=ops.backend_for(self.fused), aux=aux)

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
        return [self._postprocess(task, logits, masks, padded, size)
                for logits, masks, size in zip(outputs["pred_logits"], outputs["pred_masks"], sizes)]

    def _postprocess(self, task: str, logits: torch.Tensor, masks: torch.Tensor, padded: Tuple[int, int],
                     size: Tuple[int, int]) -> Dict:
        """One image's outputs at stride 4 -> its result: masks are upsampled to the padded input size,
        then the padding is cropped away (the official order)."""
        h, w = size
        if task == "semantic":
            return {"sem_seg": inference.semantic_inference(logits, masks, padded, fused=self.fused)[:, :h, :w]}
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


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
