"""Triton backends of the ops (kernels live in the top-level kernels/ package).

"auto" picks them for CUDA tensors only. CPU tensors are taken when the backend is named and the
kernels were imported under the Triton interpreter (TRITON_INTERPRET=1 set before triton was
imported, as the tests do), which is how CI checks them without a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import MAX_GRID_YZ
from .._mask_logits import mask_logits
from .._mask_loss import losses_from_stats, mask_loss
from .._ms_deform_attn import level_shape_tensor, ms_deform_attn
from .._point_mask_loss import add_grad_into, point_mask_loss
from .._point_uncertainty import point_uncertainty
from .._semantic_inference import semantic_inference

_error: Optional[str] = None
try:
    from fastmaskformer.kernels._common import INTERPRET
    from fastmaskformer.kernels.mask_logits import mask_logits as _mask_logits
    from fastmaskformer.kernels.mask_loss import sums as _mask_loss_sums
    from fastmaskformer.kernels.ms_deform_attn import ms_deform_attn as _ms_deform_attn_kernel
    from fastmaskformer.kernels.point_mask_loss import stats as _point_mask_loss_stats
    from fastmaskformer.kernels.point_uncertainty import point_uncertainty as _point_uncertainty
    from fastmaskformer.kernels.semantic_inference import semantic_inference as _semantic_inference
except Exception as exc:  # triton missing or broken: every triton backend reports this, none is called
    _error = f"triton kernels cannot be imported ({type(exc).__name__}: {exc})"
    INTERPRET = False
    _mask_logits = _mask_loss_sums = _semantic_inference = _ms_deform_attn_kernel = _point_mask_loss_stats = None
    _point_uncertainty = None

PRIORITY = 10


def _available() -> Optional[str]:
    return _error


def _device_reason(t: torch.Tensor) -> Optional[str]:
    """The op's own check has already put every tensor on one device; this says if it is ours."""
    device = t.device
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if INTERPRET else \
            "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    return f"Triton kernels run on cuda tensors, got {device}"


def _batch_reason(batch: int) -> Optional[str]:
    return None if batch <= MAX_GRID_YZ else f"batch {batch} exceeds the launch grid's {MAX_GRID_YZ}"


def _mask_loss(pred_masks: torch.Tensor, target_masks: torch.Tensor, num_masks, alpha: float = 0.25,
               gamma: float = 2.0):
    stats = _mask_loss_sums(pred_masks, target_masks, float(alpha), float(gamma))
    return losses_from_stats(stats, num_masks, target_masks.shape[-2] * target_masks.shape[-1])


def _supports_mask_loss(pred_masks, target_masks, *_, **__) -> Optional[str]:
    return _device_reason(pred_masks)


def _supports_mask_logits(mask_embed, pixel_embed, **_) -> Optional[str]:
    return _device_reason(mask_embed) or _batch_reason(pixel_embed.shape[0])


def _supports_semantic_inference(pred_logits, pred_masks, *_, **__) -> Optional[str]:
    if torch.is_grad_enabled() and (pred_logits.requires_grad or pred_masks.requires_grad):
        return "inference only: it has no backward (run under torch.no_grad() or detach the inputs)"
    return _device_reason(pred_masks) or _batch_reason(pred_masks.shape[0])


for _op, _fn, _supports in ((mask_loss, _mask_loss, _supports_mask_loss),
                            (mask_logits, _mask_logits, _supports_mask_logits),
                            (semantic_inference, _semantic_inference, _supports_semantic_inference)):
    _op.register("triton", _fn, available=_available, supports=_supports, auto_devices=("cuda",), priority=PRIORITY)


# ---- ms_deform_attn ----

def _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _ms_deform_attn_kernel(value, level_shape_tensor(spatial_shapes, value.device), level_start_index,
                                  sampling_locations, attention_weights)


def _supports_ms_deform_attn(value, *_, **__) -> Optional[str]:
    return _device_reason(value)


ms_deform_attn.register("triton", _ms_deform_attn, available=_available,
                        supports=_supports_ms_deform_attn, auto_devices=("cuda",), priority=PRIORITY)


# ---- point_mask_loss ----

def _point_mask_loss(pred_masks, target_masks, coords, num_masks, pred_index=None, target_index=None, groups=None,
                     grad_out=None):
    stats = _point_mask_loss_stats(add_grad_into(pred_masks, grad_out), target_masks, coords, pred_index, target_index)
    return losses_from_stats(stats, num_masks, coords.shape[1], groups)


def _supports_point_mask_loss(pred_masks, *_, **__) -> Optional[str]:
    return _device_reason(pred_masks)


point_mask_loss.register("triton", _point_mask_loss, available=_available, supports=_supports_point_mask_loss,
                         auto_devices=("cuda",), priority=PRIORITY)


# ---- point_uncertainty ----

def _point_uncertainty_backend(logits, coords, index=None):
    return _point_uncertainty(logits, coords, index)


def _supports_point_uncertainty(logits, *_, **__) -> Optional[str]:
    return _device_reason(logits)


point_uncertainty.register("triton", _point_uncertainty_backend, available=_available,
                           supports=_supports_point_uncertainty, auto_devices=("cuda",), priority=PRIORITY)
