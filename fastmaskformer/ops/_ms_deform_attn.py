"""``ms_deform_attn``: multi-scale deformable attention (Zhu et al., Deformable DETR), the sampling core.

For query q and head m, with L levels of sizes (h_l, w_l) and P points per level:

    out[b, q, m*dh:(m+1)*dh] = sum_l sum_p A[b, q, m, l, p] * bilinear(V_l[b, :, m, :], loc[b, q, m, l, p])

where V_l is level l's slice of ``value`` (rows ``level_start_index[l] .. + h_l*w_l``, row-major
over (y, x)), and ``loc`` = (x, y) in [0, 1] is a position on the level in units of its size: pixel
centre (i, j) sits at ((j + 0.5) / w_l, (i + 0.5) / h_l). Bilinear sampling reads zero outside the
map (``grid_sample`` with align_corners=False and zero padding, on the grid 2 * loc - 1), exactly as
the official PyTorch fallback ``ms_deform_attn_core_pytorch`` computes it. Fused backends compute
the same without the [B*heads, dh, Lq, L*P] tensor of sampled values.

``spatial_shapes`` is the official int64 tensor [L, 2] of (h, w), or the same as a tuple of L
``(h, w)`` int pairs: the reference needs the sizes as Python ints to split ``value``, and a tuple
made once per forward spares it a device-to-host copy per call.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._dispatch import Op

SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def level_shapes(spatial_shapes: SpatialShapes) -> Tuple[Tuple[int, int], ...]:
    """The (h, w) of every level as Python ints (one host copy for a tensor)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


@functools.lru_cache(maxsize=64)
def _level_sizes_on(sizes: Tuple[Tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64, device=device).reshape(-1, 2)


def level_shape_tensor(spatial_shapes: SpatialShapes, device: torch.device) -> torch.Tensor:
    """spatial_shapes as the int64 [L, 2] tensor that fused kernels read. A tuple of (h, w) pairs is
    copied to ``device`` once per layout and kept (a host-to-device copy of pageable memory waits for
    the stream: not one per call); while torch.compile traces, it becomes a graph constant."""
    if isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes
    sizes = level_shapes(spatial_shapes)
    if torch.compiler.is_compiling():
        return torch.tensor(sizes, dtype=torch.int64, device=device).reshape(-1, 2)
    return _level_sizes_on(sizes, torch.device(device))


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor,
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """value [B, S, heads, dh], sampling_locations [B, Lq, heads, L, P, 2] (x, y in [0, 1]),
    attention_weights [B, Lq, heads, L, P] -> [B, Lq, heads * dh]. ``level_start_index`` is implied by
    the shapes here (the levels are contiguous); fused backends read it."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)  # [B*M, dh, h, w]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # [B*M, dh, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*M, dh, Lq]
    return out.view(B, M * D, Lq).transpose(1, 2).contiguous()


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **_):
    check_tensor("value", value, 4, FLOAT_DTYPES)
    check_tensor("sampling_locations", sampling_locations, 6, FLOAT_DTYPES)
    check_tensor("attention_weights", attention_weights, 5, FLOAT_DTYPES)
    check_tensor("level_start_index", level_start_index, 1, (torch.int64,))
    if isinstance(spatial_shapes, torch.Tensor):
        check_tensor("spatial_shapes", spatial_shapes, 2, (torch.int64,))
        if spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes: expected [L, 2] (h, w per level), got shape {tuple(spatial_shapes.shape)}")
        L = spatial_shapes.shape[0]
    elif isinstance(spatial_shapes, (list, tuple)):
        if not all(isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(v) for v in s) for s in spatial_shapes):
            raise TypeError(f"spatial_shapes: expected an int64 tensor [L, 2] or a sequence of (h, w) int pairs, "
                            f"got {spatial_shapes!r}")
        L = len(spatial_shapes)
    else:
        raise TypeError(f"spatial_shapes: expected an int64 tensor [L, 2] or a sequence of (h, w) int pairs, "
                        f"got {type(spatial_shapes).__name__}")
    check_same_device(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights,
                      level_start_index=level_start_index,
                      **({"spatial_shapes": spatial_shapes} if isinstance(spatial_shapes, torch.Tensor) else {}))
    if value.dtype != sampling_locations.dtype or value.dtype != attention_weights.dtype:
        raise TypeError(f"value, sampling_locations, attention_weights: expected one dtype, got {value.dtype}, "
                        f"{sampling_locations.dtype} and {attention_weights.dtype}")
    B, S, M, _ = value.shape
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    expected = (B, Lq, M, L, P, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(f"sampling_locations: expected [B, Lq, heads, L, P, 2] = {expected} (B, heads from value, "
                         f"L from spatial_shapes), got shape {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != expected[:-1]:
        raise ValueError(f"attention_weights: expected [B, Lq, heads, L, P] = {expected[:-1]}, "
                         f"got shape {tuple(attention_weights.shape)}")
    if level_start_index.shape[0] != L:
        raise ValueError(f"level_start_index: expected {L} entries (one per level), got shape "
                         f"{tuple(level_start_index.shape)}")
    # Value-level checks only where the numbers are already on the host: never a device sync here,
    # and none while torch.compile traces (reading a tensor's values would break the graph).
    if (isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.device.type != "cpu") or \
            torch.compiler.is_compiling():
        return
    shapes = level_shapes(spatial_shapes)
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes: expected positive sizes, got {list(shapes)}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != S:
        raise ValueError(f"value: expected S = sum of h*w over spatial_shapes = {sum(sizes)} rows in dim 1, "
                         f"got shape {tuple(value.shape)}")
    if level_start_index.device.type == "cpu":
        starts = [sum(sizes[:i]) for i in range(L)]
        if level_start_index.tolist() != starts:
            raise ValueError(f"level_start_index: expected {starts} (running sums of h*w), "
                             f"got {level_start_index.tolist()}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


ms_deform_attn = Op("ms_deform_attn", ms_deform_attn_reference, check=_check)
