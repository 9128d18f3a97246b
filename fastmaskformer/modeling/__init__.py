"""The MaskFormer and Mask2Former models, in plain PyTorch; its expensive products go through ``fastmaskformer.ops``."""
from .backbone import ALIASES, BACKBONES, Backbone, FeatureSpec
from .heads import MLP, MaskClassificationHead
from .mask2former import Mask2Former
from .masked_attention_decoder import MaskedAttentionDecoder
from .maskformer import MaskFormer
from .meta_arch import MaskClassificationModel, loss_weights
from .msdeform_pixel_decoder import MSDeformAttn, MSDeformAttnPixelDecoder
from .pixel_decoder import BasePixelDecoder, TransformerEncoderPixelDecoder
from .position_encoding import PositionEmbeddingSine
from .transformer_decoder import QueryDecoder

__all__ = ["ALIASES", "BACKBONES", "Backbone", "BasePixelDecoder", "FeatureSpec", "MLP", "MSDeformAttn",
           "MSDeformAttnPixelDecoder", "Mask2Former", "MaskClassificationHead", "MaskClassificationModel",
           "MaskFormer", "MaskedAttentionDecoder", "PositionEmbeddingSine", "QueryDecoder",
           "TransformerEncoderPixelDecoder", "loss_weights"]
