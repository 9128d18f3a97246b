"""Argument checks shared by the ops: every message names the argument, what was expected and what
was received, so bad input fails here rather than deep inside a kernel."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
# CUDA's limit on a launch grid's second and third axes, which kernels may index by image: ops whose
# backends decline larger batches say so in their dispatch traits.
MAX_GRID_YZ = 65535


def check_tensor(name: str, t, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    k0, t0 = items[0]
    for k, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{k} is on {t.device} but {k0} is on {t0.device}: put them on one device")


def check_finite_scalar(name: str, v) -> None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {f}")


def check_num_masks(num_masks) -> None:
    """A positive finite number, or a 0-d float tensor (e.g. averaged over ranks on the device),
    whose value is not read here: that would be a host sync."""
    if isinstance(num_masks, torch.Tensor):
        if num_masks.dim() != 0 or not num_masks.is_floating_point():
            raise ValueError(f"num_masks: expected a number or a 0-d float tensor, got {num_masks.dtype} "
                             f"shape {tuple(num_masks.shape)}")
        return
    check_finite_scalar("num_masks", num_masks)
    if float(num_masks) <= 0:
        raise ValueError(f"num_masks: expected > 0, got {float(num_masks)}")


def check_targets(pred_logits: torch.Tensor, tgt_labels: Sequence, tgt_masks: Sequence) -> None:
    """Ragged per-image targets: labels int64 [N_i], masks [N_i, H, W], on the predictions' device.

    Only what the host knows (types, shapes, devices): reading label values would cost a host sync
    per call on a GPU. Their range is checked by :func:`check_label_values` where the values are
    read anyway (the reference path, the CPU kernels) or once a step fails (the matcher)."""
    B = pred_logits.shape[0]
    if not isinstance(tgt_labels, (list, tuple)) or not isinstance(tgt_masks, (list, tuple)):
        raise TypeError("tgt_labels and tgt_masks: expected lists of tensors, one per image, got "
                        f"{type(tgt_labels).__name__} and {type(tgt_masks).__name__}")
    if len(tgt_labels) != B or len(tgt_masks) != B:
        raise ValueError(f"targets: expected {B} images (batch size of predictions), got "
                         f"{len(tgt_labels)} label tensors and {len(tgt_masks)} mask tensors")
    hw = None
    for i, (lab, m) in enumerate(zip(tgt_labels, tgt_masks)):
        check_tensor(f"tgt_labels[{i}]", lab, 1, (torch.int64, torch.int32))
        check_tensor(f"tgt_masks[{i}]", m, 3, MASK_DTYPES)
        if m.shape[0] != lab.shape[0]:
            raise ValueError(f"tgt_masks[{i}]: expected {lab.shape[0]} masks (one per label), got shape {tuple(m.shape)}")
        if hw is None:
            hw = tuple(m.shape[-2:])
        elif tuple(m.shape[-2:]) != hw:
            raise ValueError(f"tgt_masks[{i}]: expected masks padded to the batch size {hw}, got {tuple(m.shape[-2:])}")
        check_same_device(pred_logits=pred_logits, **{f"tgt_labels[{i}]": lab, f"tgt_masks[{i}]": m})


def check_label_values(tgt_labels: Sequence[torch.Tensor], num_classes: int) -> None:
    """Every label in [0, num_classes). One reduction for the whole batch (a host sync on CUDA); the
    per-image search runs only on failure."""
    if sum(lab.numel() for lab in tgt_labels):
        lo, hi = torch.stack(torch.cat([lab.reshape(-1) for lab in tgt_labels]).aminmax()).tolist()
        if lo < 0 or hi >= num_classes:
            i = next(i for i, lab in enumerate(tgt_labels)
                     if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes))
            raise ValueError(f"tgt_labels[{i}]: labels must lie in [0, {num_classes}), got range "
                             f"[{int(tgt_labels[i].min())}, {int(tgt_labels[i].max())}]")


def check_groups(groups, n: int) -> None:
    """``groups``: None, or a sequence of ints >= 0 summing to ``n`` (the masks)."""
    if groups is None:
        return
    if isinstance(groups, torch.Tensor) or not isinstance(groups, (list, tuple)) \
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in groups):
        raise TypeError(f"groups: expected a list or tuple of ints >= 0 (masks per group), got {groups!r}")
    if sum(groups) != n:
        raise ValueError(f"groups: expected counts summing to the {n} masks, got {list(groups)} (sum {sum(groups)})")


def check_row_index(name: str, index, coords: torch.Tensor) -> int:
    """A row index (int64 or int32 [N], on the device of ``coords``) of the ops that read matched
    rows in place (point_mask_loss, point_uncertainty): its length. Its values are not read here
    (that would be a host sync on a GPU): the reference and the native backends raise an IndexError
    for a row out of range, the Triton backends give that mask NaN and no gradient."""
    check_tensor(name, index, 1, INDEX_DTYPES)
    check_same_device(coords=coords, **{name: index})
    return index.shape[0]
