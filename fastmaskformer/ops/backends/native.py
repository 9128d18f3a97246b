"""Native (C++/CUDA, fastmaskformer._C) backends of matching_cost and mask_loss.

- ``matching_cost``: the whole batch's cost in one call of ``fastmaskformer::matching_cost``, on the
  CPU (threads over images and query blocks, GIL released) or on CUDA (one launch). The targets are
  read in place at full resolution: never concatenated, converted or resized.
- ``mask_loss``: CPU only (the fused CUDA mask loss is the Triton backend's). ``mask_loss_forward``
  returns the per-mask statistics of ``ops._mask_loss.losses_from_stats``, ``mask_loss_backward``
  turns their gradient into the low-resolution logits' gradient; no N x H x W float tensor exists.

- ``linear_sum_assignment``: the batched Jonker-Volgenant solver, the whole batch in one call with
  the GIL released, images solved in parallel on the CPU, or one thread block per image on the GPU
  (a CUDA cost never leaves the device). Results live on the cost's device.

Their fake kernels and autograd live with the extension loader (``fastmaskformer._ext``). When the
extension is not built each backend says so, and the dispatcher warns and falls back to the
reference.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn.utils.rnn import pad_sequence

from fastmaskformer._ext import native_cuda_error, native_error

from .._linear_sum_assignment import CUDA_MAX_SIDE, Assignment, linear_sum_assignment
from .._mask_loss import losses_from_stats, mask_loss
from .._matching_cost import matching_cost
from .._ms_deform_attn import level_shape_tensor, ms_deform_attn
from .._point_mask_loss import add_grad_into, point_mask_loss
from .._point_matching_cost import point_matching_cost
from .._point_uncertainty import point_uncertainty

PRIORITY = 10
BYTE_MASKS = (torch.bool, torch.uint8)  # the kernels read both as bytes


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
    return losses_from_stats(stats, num_masks, target_masks.shape[-2] * target_masks.shape[-1])


def _supports_matching_cost(pred_logits, *_, **__) -> Optional[str]:
    return _device_reason(pred_logits, ("cpu", "cuda"))


def _supports_mask_loss(pred_masks, *_, **__) -> Optional[str]:
    return _device_reason(pred_masks, ("cpu",))


matching_cost.register("native", matching_cost_native, available=native_error, supports=_supports_matching_cost,
                       auto_devices=("cpu", "cuda"), priority=PRIORITY)
mask_loss.register("native", mask_loss_native, available=native_error, supports=_supports_mask_loss,
                   auto_devices=("cpu",), priority=PRIORITY)


# ---- linear_sum_assignment ----

LAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stack_problems(costs: Sequence[torch.Tensor]):
    """A list of [Q, N_b] costs as one padded [B, Q, Nmax] batch (a strided view) and its sizes."""
    sizes = torch.tensor([c.shape[1] for c in costs], dtype=torch.int64)
    # pad_sequence pads the leading dim, so pad the transposes [N_b, Q] and transpose back.
    return pad_sequence([c.t() for c in costs], batch_first=True).transpose(1, 2), sizes


def _uniform_list(costs: Sequence[torch.Tensor]) -> Optional[str]:
    first = costs[0]
    for b, c in enumerate(costs):
        if c.shape[0] != first.shape[0] or c.dtype != first.dtype or c.device != first.device:
            return (f"a list of costs must share rows, dtype and device: cost[{b}] is {tuple(c.shape)} "
                    f"{c.dtype} on {c.device}, cost[0] is {tuple(first.shape)} {first.dtype} on {first.device}")
    return None


def _supports_linear_sum_assignment(cost, sizes=None) -> Optional[str]:
    if isinstance(cost, (list, tuple)):
        if not cost:
            return None
        why = _uniform_list(cost)
        if why is not None:
            return why
        cost, sides = cost[0], (cost[0].shape[0], max(c.shape[1] for c in cost))
    else:
        sides = cost.shape[1:]
    if cost.dtype not in LAP_DTYPES:
        return f"dtype {cost.dtype} (takes {[str(d) for d in LAP_DTYPES]})"
    if cost.device.type == "cuda":
        if native_cuda_error() is not None:
            return native_cuda_error()
        if max(sides) > CUDA_MAX_SIDE:
            return f"the CUDA solver takes up to {CUDA_MAX_SIDE} rows and columns, got {tuple(sides)}"
    elif cost.device.type != "cpu":
        return f"device {cost.device} (takes cpu and cuda)"
    return None


def linear_sum_assignment_native(cost, sizes=None) -> Assignment:
    if isinstance(cost, (list, tuple)):
        if not cost:
            return []
        cost, sizes = stack_problems(cost)
    sizes = torch.as_tensor(sizes)
    if sizes.device.type != "cpu" or sizes.dtype != torch.int64:
        sizes = sizes.to("cpu", torch.int64)
    if cost.shape[0] == 0:
        return []
    pairs = torch.ops.fastmaskformer.linear_sum_assignment(cost, sizes)
    Q = cost.shape[1]
    return split_pairs(pairs, [n if n < Q else Q for n in sizes.tolist()])


def split_pairs(pairs: torch.Tensor, counts: List[int]) -> Assignment:
    """The packed [2, >= sum(counts)] pairs as one (rows, cols) pair of views per image."""
    total = sum(counts)
    return list(zip(pairs[0, :total].split_with_sizes(counts), pairs[1, :total].split_with_sizes(counts)))


# "auto" rules, from measurements on this project's shared 2-core CPU (Intel Xeon, torch 2.14, median
# per call). The baseline is what the official matcher runs, scipy's solver on each image's float32
# array in a plain loop; "reference" is our op's reference (that loop behind the op's checks and
# float64 conversions):
#   B x Q x N        scipy loop   reference         native           lapjv (never picked by "auto")
#   16 x 100 x 10      94.6 us    353 us (0.27x)    48.7 us (1.9x)   2.21 ms (0.04x)
#   16 x 100 x 50       668 us    1.11 ms (0.60x)    222 us (3.0x)   2.52 ms (0.26x)
#   16 x 100 x 100     4.07 ms    4.75 ms (0.86x)   1.07 ms (3.8x)   3.41 ms (1.19x)
# (benchmarks/results/linear_sum_assignment_cpu.md). native is the fastest at every size, so it
# takes every CPU call it supports. lapjv pays for padding to a square and beats the loop only on
# near-square problems, where native beats it too. For a CUDA cost "auto" picks the device solver
# (no host copy); its speed against copying to the host and solving there has not been measured
# yet (no GPU was lent): benchmarks/test_bench_linear_sum_assignment.py times both.
linear_sum_assignment.register("native", linear_sum_assignment_native, available=native_error,
                               supports=_supports_linear_sum_assignment, priority=30)


# ---- ms_deform_attn ----

def ms_deform_attn_native(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The CPU kernel (csrc/ops/cpu/ms_deform_attn_kernel.cpp); its backward is the op's registered
    autograd, so no [B*heads, dh, Lq, L*P] sample tensor exists in either pass."""
    return torch.ops.fastmaskformer.ms_deform_attn_forward(value, level_shape_tensor(spatial_shapes, value.device),
                                                           level_start_index, sampling_locations, attention_weights)


def _supports_ms_deform_attn(value, *_, **__) -> Optional[str]:
    return _device_reason(value, ("cpu",))


ms_deform_attn.register("native", ms_deform_attn_native, available=native_error, supports=_supports_ms_deform_attn,
                        auto_devices=("cpu",), priority=PRIORITY)


# ---- point_mask_loss ----

class _PointMaskLossInto(torch.autograd.Function):
    """point_mask_loss_forward whose backward scatters into a caller's float32 buffer
    (point_mask_loss_backward_into) and passes it on as the logits' gradient."""

    @staticmethod
    def forward(ctx, pred_masks, target_masks, coords, pred_index, target_index, grad_out):
        ctx.save_for_backward(pred_masks, target_masks, coords, pred_index, target_index)
        ctx.grad_out = grad_out
        return torch.ops.fastmaskformer.point_mask_loss_forward(pred_masks, target_masks, coords, pred_index,
                                                                target_index)

    @staticmethod
    def backward(ctx, grad_stats):
        pred_masks, target_masks, coords, pred_index, target_index = ctx.saved_tensors
        torch.ops.fastmaskformer.point_mask_loss_backward_into(grad_stats, pred_masks, target_masks, coords,
                                                               pred_index, target_index, ctx.grad_out)
        return ctx.grad_out, None, None, None, None, None


def point_mask_loss_native(pred_masks, target_masks, coords, num_masks, pred_index=None, target_index=None,
                           groups=None, grad_out=None):
    """The CPU kernel (csrc/ops/cpu/point_mask_loss_kernel.cpp): per-mask statistics of the points, the
    mask losses' contract with BCE for focal and the P points for the pixels; its backward scatters
    each point's gradient into the logits' taps (of the rows the masks read), into ``grad_out`` when
    one is given (float32). No [N, P] tensor exists in either pass, and no gathered copy of the rows."""
    if grad_out is not None and pred_masks.requires_grad and pred_masks.dtype == torch.float32:
        stats = _PointMaskLossInto.apply(pred_masks, target_masks, coords, pred_index, target_index, grad_out)
    else:
        stats = torch.ops.fastmaskformer.point_mask_loss_forward(add_grad_into(pred_masks, grad_out), target_masks,
                                                                 coords, pred_index, target_index)
    return losses_from_stats(stats, num_masks, coords.shape[1], groups)


def _supports_point_mask_loss(pred_masks, *_, **__) -> Optional[str]:
    return _device_reason(pred_masks, ("cpu",))


point_mask_loss.register("native", point_mask_loss_native, available=native_error,
                         supports=_supports_point_mask_loss, auto_devices=("cpu",), priority=PRIORITY)


# ---- point_matching_cost ----

@torch.no_grad()
def point_matching_cost_native(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                               tgt_labels: Sequence[torch.Tensor], tgt_masks: Sequence[torch.Tensor],
                               coords: torch.Tensor, cost_class: float = 2.0, cost_mask: float = 5.0,
                               cost_dice: float = 5.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole batch in one call of ``fastmaskformer::point_matching_cost`` (CPU threads over images
    and query blocks, or one CUDA launch): both masks are sampled at the points inside the kernel,
    the targets in place, so no [Q, P] or [N, P] sampled tensor exists."""
    sizes = torch.tensor([int(m.shape[0]) for m in tgt_masks], dtype=torch.int64)
    labels = [lab.to(device=pred_logits.device, dtype=torch.int64) for lab in tgt_labels]
    labels = torch.cat(labels) if labels else pred_logits.new_empty(0, dtype=torch.int64)
    cost = torch.ops.fastmaskformer.point_matching_cost(pred_logits, pred_masks, labels, _one_mask_dtype(tgt_masks),
                                                        coords, float(cost_class), float(cost_mask), float(cost_dice))
    return cost, sizes


point_matching_cost.register("native", point_matching_cost_native, available=native_error,
                             supports=_supports_matching_cost, auto_devices=("cpu", "cuda"), priority=PRIORITY)


# ---- point_uncertainty ----

def point_uncertainty_native(logits, coords, index=None):
    """The CPU kernel (csrc/ops/cpu/point_uncertainty_kernel.cpp): the rows read in place, one [N, S]
    output and no other tensor of that size."""
    return torch.ops.fastmaskformer.point_uncertainty(logits, coords, index)


def _supports_point_uncertainty(logits, *_, **__) -> Optional[str]:
    return _device_reason(logits, ("cpu",))


point_uncertainty.register("native", point_uncertainty_native, available=native_error,
                           supports=_supports_point_uncertainty, auto_devices=("cpu",), priority=PRIORITY)
