"""MaskFormer (Cheng et al., NeurIPS 2021): backbone -> pixel decoder -> transformer decoder -> heads,
with its matcher and criterion for training; predict() and post-processing live in the shared base."""
from __future__ import annotations

from typing import Collection, Dict, Optional, Sequence

import torch

from .. import ops
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from .heads import MaskClassificationHead
from .meta_arch import TASKS, Images, MaskClassificationModel, check_positive_int, loss_weights
from .pixel_decoder import BasePixelDecoder, TransformerEncoderPixelDecoder
from .transformer_decoder import QueryDecoder

PIXEL_DECODERS = ("base", "transformer_encoder")
__all__ = ["Images", "MaskFormer", "PIXEL_DECODERS", "TASKS", "loss_weights"]


class MaskFormer(MaskClassificationModel):
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
        check_positive_int("num_classes", num_classes)
        check_positive_int("num_queries", num_queries)
        check_positive_int("size_divisibility", size_divisibility)
        if pixel_decoder not in PIXEL_DECODERS:
            raise ValueError(f"pixel_decoder: expected one of {PIXEL_DECODERS}, got {pixel_decoder!r}")
        super().__init__(num_classes, backbone, pretrained, pixel_mean, pixel_std, size_divisibility,
                         object_mask_threshold, overlap_threshold, test_topk_per_image, thing_classes)
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
        matcher = HungarianMatcher(cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight, fused=fused)
        weight_dict = loss_weights(class_weight, mask_weight, dice_weight, dec_layers - 1 if deep_supervision else 0)
        criterion = SetCriterion(num_classes, matcher, weight_dict, no_object_weight, ("labels", "masks"), fused=fused)
        self._set_loss(matcher, criterion, fused)

    def _forward_normalized(self, x: torch.Tensor, aux: bool = True) -> Dict:
        features = self.backbone(x)
        mask_features, transformer_input = self.pixel_decoder(features)
        hs = self.transformer_decoder(transformer_input)
        return self.head(hs, mask_features, backend=ops.backend_for(self.fused), aux=aux)
