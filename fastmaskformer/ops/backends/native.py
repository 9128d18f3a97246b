"""Native (C++/CUDA, fastmaskformer._C) backends of matching_cost and mask_loss.

- ``matching_cost``: the whole batch's cost in one call of ``fastmaskformer::matching_cost``, on the
  CPU (threads over images and query blocks, GIL released) or on CUDA (one launch). The targets are
  read in place at full resolution: never concatenated, converted or resized.
- ``mask_loss``: CPU only (the fused CUDA mask loss is the Triton backend's). ``mask_loss_forward``
  returns per-mask sums of the upsampled logits' focal and dice terms, ``mask_loss_backward`` turns
  their gradient into the low-resolution logits' gradient; no N x H x W float tensor exists.

The ops' fake (meta) kernels and mask_loss_forward's autograd are registered here, so torch.compile
and torch.export trace them without graph breaks. When the extension is not built each backend
says so, and the dispatcher warns and falls back to the reference.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastmaskformer._ext import native_cuda_error, native_error

from ..mask_loss import losses_from_stats, mask_loss
from ..matching_cost import matching_cost

PRIORITY = 10
BYTE_MASKS = (torch.bool, torch.uint8)  # the kernels read both as bytes
STATS = 4  # per mask: focal loss mean, sum s*t, sum s, sum t (s = sigmoid of the upsampled logits)


def _device_reason(t: torch.Tensor, devices: Tuple[str, ...]) -> Optional[str]:
    if t.device.type not in devices:
        return f"native {'/'.join(devices)} kernels only, got a tensor on {t.device}"
    return native_cuda_error() if t.device.type == "cuda" else None


def _one_mask_dtype(masks: Sequence[torch.Tensor]) -> list:
    """The kernels read one mask dtype per batch: bool and uint8 mix freely; other mixes become float32."""
    dtypes = {m.dtype for m in masks}
    if len(dtypes) <= 1 or dtypes <= set(BYTE_MASKS):
        return list(masks)
    return [m.float() for m in masks]


@torch.no_grad()
def matching_cost_native(pred_logits: torch.Tensor, pred_masks: torch.Tensor, tgt_labels: Sequence[torch.Tensor],
                         tgt_masks: Sequence[torch.Tensor], cost_class: float = 1.0, cost_mask: float = 1.0,
                         cost_dice: float = 1.0, alpha: float = 0.25,
                         gamma: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    sizes = torch.tensor([int(m.shape[0]) for m in tgt_masks], dtype=torch.int64)
    labels = [lab.to(device=pred_logits.device, dtype=torch.int64) for lab in tgt_labels]
    labels = torch.cat(labels) if labels else pred_logits.new_empty(0, dtype=torch.int64)
    cost = torch.ops.fastmaskformer.matching_cost(pred_logits, pred_masks, labels, _one_mask_dtype(tgt_masks),
                                                  float(cost_class), float(cost_mask), float(cost_dice),
                                                  float(alpha), float(gamma))
    return cost, sizes


def mask_loss_native(pred_masks: torch.Tensor, target_masks: torch.Tensor, num_masks: float, alpha: float = 0.25,
                     gamma: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    stats = torch.ops.fastmaskformer.mask_loss_forward(pred_masks, target_masks, float(alpha), float(gamma))
    return losses_from_stats(stats, num_masks)


def _supports_matching_cost(pred_logits, *_, **__) -> Optional[str]:
    return _device_reason(pred_logits, ("cpu", "cuda"))


def _supports_mask_loss(pred_masks, *_, **__) -> Optional[str]:
    return _device_reason(pred_masks, ("cpu",))


def _register_torch_library() -> None:
    @torch.library.register_fake("fastmaskformer::matching_cost")
    def _matching_cost_fake(pred_logits, pred_masks, tgt_labels, tgt_masks, cost_class, cost_mask, cost_dice,
                            alpha, gamma):
        n_max = max((m.shape[0] for m in tgt_masks), default=0)
        return pred_logits.new_empty((pred_logits.shape[0], pred_logits.shape[1], n_max), dtype=torch.float32)

    @torch.library.register_fake("fastmaskformer::mask_loss_forward")
    def _mask_loss_forward_fake(pred_masks, target_masks, alpha, gamma):
        return pred_masks.new_empty((pred_masks.shape[0], STATS), dtype=torch.float32)

    @torch.library.register_fake("fastmaskformer::mask_loss_backward")
    def _mask_loss_backward_fake(grad_stats, pred_masks, target_masks, alpha, gamma):
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
            grad = torch.ops.fastmaskformer.mask_loss_backward(grad_stats, pred_masks, target_masks, ctx.alpha,
                                                               ctx.gamma)
        return grad, None, None, None

    torch.library.register_autograd("fastmaskformer::mask_loss_forward", backward, setup_context=setup_context)


if native_error() is None:
    _register_torch_library()

matching_cost.register("native", matching_cost_native, available=native_error, supports=_supports_matching_cost,
                       auto_devices=("cpu", "cuda"), priority=PRIORITY)
mask_loss.register("native", mask_loss_native, available=native_error, supports=_supports_mask_loss,
                   auto_devices=("cpu",), priority=PRIORITY)
