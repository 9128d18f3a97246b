"""``linear_sum_assignment``: minimum-cost bipartite matching for a batch of cost matrices.

``cost`` is [B, Q, Nmax] with ``sizes`` [B] (image b uses cost[b, :, :sizes[b]]), or a list of
[Q, N_b] matrices. Returns, per image, ``(rows, cols)`` int64 tensors in scipy's convention: rows
ascending, min(Q, N_b) pairs. +inf marks a forbidden pair; NaN, -inf, or a problem with no
feasible complete matching raise a ValueError naming the image.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import check_same_device, check_tensor
from ._dispatch import Op

Assignment = List[Tuple[torch.Tensor, torch.Tensor]]
# The native CUDA solver keeps one image's per-column state in shared memory (its kMaxSide).
CUDA_MAX_SIDE = 1024


def as_problems(cost, sizes) -> List[torch.Tensor]:
    """The per-image [Q, N_b] views of a padded batch or a list (no copies)."""
    if isinstance(cost, (list, tuple)):
        return list(cost)
    return [cost[b, :, : int(sizes[b])] for b in range(cost.shape[0])]


def check_problem(b: int, c: np.ndarray) -> None:
    if np.isnan(c).any():
        raise ValueError(f"linear_sum_assignment: cost of image {b} contains NaN")
    if np.isneginf(c).any():
        raise ValueError(f"linear_sum_assignment: cost of image {b} contains -inf")


def linear_sum_assignment_reference(cost: Union[torch.Tensor, Sequence[torch.Tensor]],
                                    sizes: Optional[torch.Tensor] = None) -> Assignment:
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    out = []
    for b, c in enumerate(as_problems(cost, sizes)):
        c_np = c.detach().to("cpu", torch.float64).numpy()
        check_problem(b, c_np)
        try:
            rows, cols = scipy_lsa(c_np)
        except ValueError as exc:  # scipy: "cost matrix is infeasible"
            raise ValueError(f"linear_sum_assignment: image {b} has no feasible matching ({exc})") from None
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def _check(cost, sizes=None, **_):
    if isinstance(cost, (list, tuple)):
        for b, c in enumerate(cost):
            check_tensor(f"cost[{b}]", c, 2)
            if not c.is_floating_point():
                raise TypeError(f"cost[{b}]: expected a floating-point tensor, got {c.dtype}")
        check_same_device(**{f"cost[{b}]": c for b, c in enumerate(cost)})
        return
    check_tensor("cost", cost, 3)
    if not cost.is_floating_point():
        raise TypeError(f"cost: expected a floating-point tensor, got {cost.dtype}")
    if sizes is None:
        raise ValueError("sizes: required with a padded [B, Q, Nmax] cost")
    sizes_t = torch.as_tensor(sizes)
    if sizes_t.is_floating_point() or sizes_t.is_complex() or sizes_t.dtype == torch.bool:
        raise TypeError(f"sizes: expected an integer tensor, got {sizes_t.dtype}")
    if sizes_t.device.type not in ("cpu", cost.device.type):
        raise ValueError(f"sizes is on {sizes_t.device} but cost is on {cost.device}: put sizes on the cpu or with cost")
    if sizes_t.shape != (cost.shape[0],):
        raise ValueError(f"sizes: expected shape ({cost.shape[0]},), got {tuple(sizes_t.shape)}")
    if sizes_t.numel():  # one reduction (sizes live on the host: no sync)
        lo, hi = (int(v) for v in sizes_t.aminmax())
        if lo < 0 or hi > cost.shape[2]:
            raise ValueError(f"sizes: expected values in [0, {cost.shape[2]}], got range [{lo}, {hi}]")


def _traits(cost, sizes=None, **_):
    """(a list, of one shape/dtype/device, a side beyond the CUDA solver's): what backends decline."""
    if isinstance(cost, (list, tuple)):
        if not cost:
            return True, True, False
        first = cost[0]
        uniform = all(c.shape[0] == first.shape[0] and c.dtype == first.dtype and c.device == first.device
                      for c in cost)
        return True, uniform, max(first.shape[0], max(c.shape[1] for c in cost)) > CUDA_MAX_SIDE
    return False, True, max(cost.shape[1], cost.shape[2]) > CUDA_MAX_SIDE


linear_sum_assignment = Op("linear_sum_assignment", linear_sum_assignment_reference, check=_check, traits=_traits)
