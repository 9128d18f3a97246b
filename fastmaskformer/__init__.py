"""fastmaskformer: MaskFormer training with fused kernels for its expensive parts."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from ._ext import build_info  # noqa: E402
from .criterion import SetCriterion  # noqa: E402
from .matcher import HungarianMatcher  # noqa: E402
from .modeling import Mask2Former, MaskFormer  # noqa: E402

__all__ = ["HungarianMatcher", "Mask2Former", "MaskFormer", "SetCriterion", "__version__", "build_info", "ops"]
