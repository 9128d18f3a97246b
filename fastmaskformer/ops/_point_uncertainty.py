"""``point_uncertainty``: how uncertain mask logits are at candidate points (Mask2Former's importance
sampling ranks candidates by it).

Row ``index[n]`` of ``logits`` [M, h, w] (row n without ``index``) is read at the points
``coords[n]`` [S, 2] ((x, y) in [0, 1]) bilinearly with zero padding (``point_sample``:
``grid_sample(m, 2 * c - 1, align_corners=False)``); the result is the official
``calculate_uncertainty`` of those values, -|x|, as float32 [N, S] (also under autocast).

No gradient: the criterion ranks the points under ``no_grad``. ``index`` lets the criterion pass a
layer's logits [B Q, h, w] with the matched rows instead of a gathered copy. Its values are not read
on the host (a sync on a GPU): the reference and the native backend raise an IndexError for a row
out of range, the Triton backend returns NaN for that mask, never a read out of bounds.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..point_sampling import point_sample
from ._checks import FLOAT_DTYPES, check_row_index, check_same_device, check_tensor
from ._dispatch import Op


@torch.no_grad()
def point_uncertainty_reference(logits: torch.Tensor, coords: torch.Tensor,
                                index: Optional[torch.Tensor] = None) -> torch.Tensor:
    if index is not None:
        logits = logits[index]
    with torch.autocast(logits.device.type, enabled=False):
        return -point_sample(logits[:, None].float(), coords.float())[:, 0].abs()


def _check(logits, coords, index=None, **_):
    check_tensor("logits", logits, 3, FLOAT_DTYPES)
    check_tensor("coords", coords, 3, FLOAT_DTYPES)
    check_same_device(logits=logits, coords=coords)
    N = coords.shape[0]
    if coords.shape[2] != 2:
        raise ValueError(f"coords: expected [N, S, 2] ((x, y) points per mask), got shape {tuple(coords.shape)}")
    if index is None:
        if logits.shape[0] != N:
            raise ValueError(f"logits: expected {N} masks (one per set of points) when index is not given, got shape "
                             f"{tuple(logits.shape)}")
    elif check_row_index("index", index, coords) != N:
        raise ValueError(f"index: expected shape [{N}] (one row per set of points), got {tuple(index.shape)}")
    if N and coords.shape[1] and 0 in logits.shape[-2:]:
        raise ValueError(f"logits: empty spatial size {tuple(logits.shape[-2:])}")


point_uncertainty = Op("point_uncertainty", point_uncertainty_reference, check=_check)
