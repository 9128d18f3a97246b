"""The MaskFormer model, in plain PyTorch; its expensive products go through ``fastmaskformer.ops``."""
from .backbone import ALIASES, BACKBONES, Backbone, FeatureSpec
from .heads import MLP, MaskClassificationHead
from .maskformer import MaskFormer, loss_weights
from .pixel_decoder import BasePixelDecoder, TransformerEncoderPixelDecoder
from .position_encoding import PositionEmbeddingSine
from .transformer_decoder import QueryDecoder

__all__ = ["ALIASES", "BACKBONES", "Backbone", "BasePixelDecoder", "FeatureSpec", "MLP", "MaskClassificationHead",
           "MaskFormer", "PositionEmbeddingSine", "QueryDecoder", "TransformerEncoderPixelDecoder", "loss_weights"]
