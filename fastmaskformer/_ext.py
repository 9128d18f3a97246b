"""Loading fastmaskformer._C, the C++/CUDA extension, and registering what torch needs to know about
its ops: the one place that does so, like torchvision's ``_register_*`` blocks.

For every ``torch.ops.fastmaskformer.*`` op built from csrc/ this module registers its fake (meta)
kernel, so torch.compile and torch.export trace it without running it, and, where the op has a
backward, its autograd formula. Importing this module never fails: when the extension is missing or
does not load against the installed torch, ``native_error()`` says why and the native backends of
``fastmaskformer.ops`` report it as their reason.
"""
from __future__ import annotations

from typing import Optional

import torch

_C = None
_error: Optional[str] = None
try:
    from fastmaskformer import _C  # noqa: F811  (registers torch.ops.fastmaskformer.*)
except Exception as exc:  # not built, or built against another torch
    _error = f"fastmaskformer._C is not available ({type(exc).__name__}: {exc}); build it with `make build` " \
             f"or `pip install --no-build-isolation -e .`"

MASK_LOSS_STATS = 4  # columns of the per-mask statistics (see fastmaskformer.ops._mask_loss)


def native_error() -> Optional[str]:
    """None when _C is loaded, else why it is not."""
    return _error


def native_cuda_error() -> Optional[str]:
    """None when _C was built with its CUDA sources, else why not."""
    if _error is not None:
        return _error
    if not _C.build_info()["with_cuda"]:
        return "fastmaskformer._C was built without its CUDA sources (no nvcc, or FASTMASKFORMER_CUDA=0)"
    return None


def build_info() -> dict:
    if _error is not None:
        return {"available": False, "error": _error}
    return {"available": True, **_C.build_info()}


def _register_matching_cost() -> None:
    @torch.library.register_fake("fastmaskformer::matching_cost")
    def _fake(pred_logits, pred_masks, tgt_labels, tgt_masks, cost_class, cost_mask, cost_dice, alpha, gamma):
        n_max = max((m.shape[0] for m in tgt_masks), default=0)
        return pred_logits.new_empty((pred_logits.shape[0], pred_logits.shape[1], n_max), dtype=torch.float32)


def _register_mask_loss() -> None:
    @torch.library.register_fake("fastmaskformer::mask_loss_forward")
    def _forward_fake(pred_masks, target_masks, alpha, gamma):
        return pred_masks.new_empty((pred_masks.shape[0], MASK_LOSS_STATS), dtype=torch.float32)

    @torch.library.register_fake("fastmaskformer::mask_loss_backward")
    def _backward_fake(grad_stats, pred_masks, target_masks, alpha, gamma):
        return pred_masks.new_empty(pred_masks.shape)

    def setup_context(ctx, inputs, output):
        pred_masks, target_masks, alpha, gamma = inputs
        ctx.save_for_backward(pred_masks, target_masks)
        ctx.alpha, ctx.gamma = alpha, gamma

    def backward(ctx, grad_stats):
        # Targets are data: no gradient flows to them.
        pred_masks, target_masks = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastmaskformer.mask_loss_backward(grad_stats, pred_masks, target_masks,
                                                               ctx.alpha, ctx.gamma)
        return grad, None, None, None

    torch.library.register_autograd("fastmaskformer::mask_loss_forward", backward, setup_context=setup_context)


def _register_linear_sum_assignment() -> None:
    @torch.library.register_fake("fastmaskformer::linear_sum_assignment")
    def _fake(cost, sizes):
        return cost.new_empty((2, cost.shape[0] * min(cost.shape[1], cost.shape[2])), dtype=torch.int64)


def _register_ms_deform_attn() -> None:
    @torch.library.register_fake("fastmaskformer::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, heads, dh = value.shape
        return value.new_empty((B, sampling_locations.shape[1], heads * dh))

    @torch.library.register_fake("fastmaskformer::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
                attention_weights.new_empty(attention_weights.shape))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        # One op computes all three gradients (they share every bilinear read); the level sizes and
        # offsets are integers and get none.
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grads = torch.ops.fastmaskformer.ms_deform_attn_backward(grad_output, value, shapes, starts, locations, weights)
        return grads[0], None, None, grads[1], grads[2]

    torch.library.register_autograd("fastmaskformer::ms_deform_attn_forward", backward, setup_context=setup_context)


def _register_point_mask_loss() -> None:
    @torch.library.register_fake("fastmaskformer::point_mask_loss_forward")
    def _forward_fake(pred_masks, target_masks, coords, pred_index=None, target_index=None):
        return pred_masks.new_empty((coords.shape[0], MASK_LOSS_STATS), dtype=torch.float32)

    @torch.library.register_fake("fastmaskformer::point_mask_loss_backward")
    def _backward_fake(grad_stats, pred_masks, target_masks, coords, pred_index=None, target_index=None):
        return pred_masks.new_empty(pred_masks.shape)

    @torch.library.register_fake("fastmaskformer::point_mask_loss_backward_into")
    def _backward_into_fake(grad_stats, pred_masks, target_masks, coords, pred_index, target_index, grad):
        return None

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the optional row indices may be None

    def backward(ctx, grad_stats):
        # Targets are data and the criterion draws the points without a gradient: only the logits get one.
        pred_masks, target_masks, coords, pred_index, target_index = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastmaskformer.point_mask_loss_backward(grad_stats, pred_masks, target_masks, coords,
                                                                     pred_index, target_index)
        return grad, None, None, None, None

    torch.library.register_autograd("fastmaskformer::point_mask_loss_forward", backward, setup_context=setup_context)


def _register_point_matching_cost() -> None:
    @torch.library.register_fake("fastmaskformer::point_matching_cost")
    def _fake(pred_logits, pred_masks, tgt_labels, tgt_masks, coords, cost_class, cost_mask, cost_dice):
        n_max = max((m.shape[0] for m in tgt_masks), default=0)
        return pred_logits.new_empty((pred_logits.shape[0], pred_logits.shape[1], n_max), dtype=torch.float32)


def _register_point_uncertainty() -> None:
    @torch.library.register_fake("fastmaskformer::point_uncertainty")
    def _fake(logits, coords, index=None):
        return logits.new_empty(coords.shape[:2], dtype=torch.float32)


if _C is not None:
    _register_matching_cost()
    _register_mask_loss()
    _register_linear_sum_assignment()
    _register_ms_deform_attn()
    _register_point_mask_loss()
    _register_point_matching_cost()
    _register_point_uncertainty()
