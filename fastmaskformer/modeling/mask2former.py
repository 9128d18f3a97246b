"""Mask2Former (Cheng et al., CVPR 2022): backbone -> multi-scale deformable-attention pixel decoder
-> masked-attention transformer decoder -> the shared prediction head, with the point-sampled
matcher and criterion; predict() and post-processing live in the shared base."""
from __future__ import annotations

from typing import Collection, Dict, Optional, Sequence

import torch

from .. import ops
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from .heads import MaskClassificationHead
from .masked_attention_decoder import MaskedAttentionDecoder
from .meta_arch import MaskClassificationModel, check_positive_int, loss_weights
from .msdeform_pixel_decoder import MSDeformAttnPixelDecoder


MASK_SAMPLING = ("points", "full")

class Mask2Former(MaskClassificationModel):
    """Mask2Former for semantic, panoptic and instance segmentation.

    Args:
        num_classes: K, the number of classes (the class head adds a "no object" class).
        backbone: a timm backbone name from ``fastmaskformer.modeling.BACKBONES`` (or an alias).
        num_queries: number of learned queries Q.
        hidden_dim: width of the transformer decoder.
        mask_dim: channels of the per-pixel and per-query mask embeddings.
        nheads: attention heads of every decoder layer.
        dim_feedforward: FFN width of every decoder layer.
        dec_layers: masked-attention decoder layers L; the model predicts L + 1 times (the initial
            queries and after each layer), L of them auxiliary.
        conv_dim: channels of the pixel decoder (a multiple of 32).
        enc_layers: deformable encoder layers of the pixel decoder.
        enc_nheads, enc_n_points, enc_dim_feedforward: heads, sampling points per head and level,
            and FFN width of the deformable encoder layers.
        dropout: dropout of every transformer layer (0 in the official recipes).
        deep_supervision: predict (and train) on every decoder layer; adds "aux_outputs".
        class_weight, mask_weight, dice_weight: weights of the classification, point BCE and point
            dice losses and matching costs.
        no_object_weight: cross-entropy weight of the "no object" class (eos_coef).
        num_points: points sampled per mask by the matcher and the criterion (112 x 112).
        oversample_ratio, importance_sample_ratio: the criterion's importance sampling: draws
            ``oversample_ratio * num_points`` candidates, keeps this fraction of the most uncertain.
        mask_sampling: "points" (the official loss and cost, BCE + dice on sampled points) or
            "full": the exact full-resolution BCE + dice (sigmoid focal with gamma 0 and no alpha)
            through ``ops.mask_loss`` and ``ops.matching_cost``, no point sampling; with
            ``fused=True`` it never writes a full-resolution float tensor, so it can cost no more
            than the sampled loss (benchmarks/test_bench_mask2former_loss.py).
        pretrained, pixel_mean, pixel_std, size_divisibility, object_mask_threshold,
        overlap_threshold, test_topk_per_image, thing_classes, fused: as in :class:`MaskFormer`.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", num_queries: int = 100, hidden_dim: int = 256,
                 mask_dim: int = 256, nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9,
                 conv_dim: int = 256, enc_layers: int = 6, enc_nheads: int = 8, enc_n_points: int = 4,
                 enc_dim_feedforward: int = 1024, dropout: float = 0.0, deep_supervision: bool = True,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, mask_sampling: str = "points",
                 pretrained: Optional[str] = None,
                 pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 pixel_std: Sequence[float] = (0.229, 0.224, 0.225), size_divisibility: int = 32,
                 object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, test_topk_per_image: int = 100,
                 thing_classes: Optional[Collection[int]] = None, fused: bool = False):
        check_positive_int("num_classes", num_classes)
        check_positive_int("num_queries", num_queries)
        check_positive_int("size_divisibility", size_divisibility)
        check_positive_int("dec_layers", dec_layers)
        check_positive_int("num_points", num_points)
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio: expected a fraction in [0, 1], got {importance_sample_ratio}")
        if oversample_ratio < 1.0:
            raise ValueError(f"oversample_ratio: expected >= 1, got {oversample_ratio}")
        if mask_sampling not in MASK_SAMPLING:
            raise ValueError(f"mask_sampling: expected one of {MASK_SAMPLING}, got {mask_sampling!r}")
        super().__init__(num_classes, backbone, pretrained, pixel_mean, pixel_std, size_divisibility,
                         object_mask_threshold, overlap_threshold, test_topk_per_image, thing_classes)
        self.pixel_decoder = MSDeformAttnPixelDecoder(self.backbone.feature_info, conv_dim, mask_dim, enc_layers,
                                                      enc_nheads, enc_n_points, enc_dim_feedforward, dropout)
        self.transformer_decoder = MaskedAttentionDecoder(conv_dim, hidden_dim, num_queries, nheads, dim_feedforward,
                                                          dec_layers, dropout)
        self.head = MaskClassificationHead(hidden_dim, num_classes, mask_dim, deep_supervision)
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio, self.mask_sampling = importance_sample_ratio, mask_sampling
        # The point-sampled matcher and criterion (official semantics): BCE + dice on sampled points;
        # or the same terms on full masks: focal with gamma 0 and no alpha weighting is BCE.
        points = num_points if mask_sampling == "points" else 0
        bce = dict(alpha=-1.0, gamma=0.0)
        matcher = HungarianMatcher(cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight,
                                   num_points=points, fused=fused, **bce)
        weight_dict = loss_weights(class_weight, mask_weight, dice_weight, dec_layers if deep_supervision else 0)
        criterion = SetCriterion(num_classes, matcher, weight_dict, no_object_weight, ("labels", "masks"),
                                 num_points=points, oversample_ratio=oversample_ratio,
                                 importance_sample_ratio=importance_sample_ratio, fused=fused,
                                 focal_alpha=bce["alpha"], focal_gamma=bce["gamma"])
        self._set_loss(matcher, criterion, fused)

    def _forward_normalized(self, x: torch.Tensor, aux: bool = True) -> Dict:
        backend = ops.backend_for(self.fused)
        features = self.backbone(x)
        mask_features, multi_scale = self.pixel_decoder(features, backend=backend)
        hs = self.transformer_decoder(multi_scale, mask_features, self.head.mask_embed, backend=backend)
        return self.head(hs, mask_features, backend=backend, aux=aux)
