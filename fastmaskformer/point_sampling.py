"""Point sampling for Mask2Former's matcher and criterion (official semantics, plain PyTorch).

Masks are compared on sampled points instead of full-resolution pixels. A point is (x, y) in
[0, 1] x [0, 1], in units of the map's width and height (pixel centre (i, j) of an h x w map is
((j + 0.5) / w, (i + 0.5) / h)); values between pixels are bilinear and zero outside the map, as
``grid_sample(input, 2 * coords - 1, align_corners=False)`` reads them.

- matcher: one set of uniform points per image, shared by its queries and targets
  (:func:`random_point_coords`), then :func:`point_mask_cost`;
- criterion: importance sampling per matched prediction (:func:`uncertain_point_coords`), then
  :func:`point_mask_loss`.

The random draws take a ``torch.Generator`` (on the tensors' device) or use the global RNG; every
function after the draw takes the coordinates as an input, so tests can fix them.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_tensor


def point_sample(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """input [N, C, H, W] (float), coords [N, P, 2] (x, y) in [0, 1] -> [N, C, P], bilinear with zero
    padding (``grid_sample`` on ``2 * coords - 1``, align_corners=False)."""
    check_tensor("input", input, 4, FLOAT_DTYPES)
    check_tensor("coords", coords, 3, FLOAT_DTYPES)
    check_same_device(input=input, coords=coords)
    if coords.shape[0] != input.shape[0] or coords.shape[2] != 2:
        raise ValueError(f"coords: expected [N, P, 2] with N = {input.shape[0]} (input's batch), "
                         f"got shape {tuple(coords.shape)}")
    grid = (2 * coords - 1).to(input.dtype)[:, :, None, :]  # [N, P, 1, 2]
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


@torch.compiler.disable
def _uniform(*size: int, device: Optional[torch.device], generator: Optional[torch.Generator],
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.rand, run eagerly under torch.compile: Dynamo cannot draw a tensor whose size depends on
    the data (the number of matched masks changes every step: "SymIntArrayRef expected to contain
    only concrete integers"), so a compiled loss breaks its graph around the draw instead of failing.
    ``out``: a float32 tensor of that size to draw into."""
    if out is not None:
        return torch.rand(*size, generator=generator, out=out)
    return torch.rand(*size, device=device, generator=generator, dtype=torch.float32)


def random_point_coords(n: int, num_points: int, device: Optional[torch.device] = None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n, num_points, 2] float32 points uniform in [0, 1)^2 (the matcher's per-image points: n = 1)."""
    _check_count("num_points", num_points)
    return _uniform(n, num_points, 2, device=device, generator=generator)


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Importance sampling of points where the mask logits are uncertain (the official
    ``get_uncertain_point_coords_with_randomness`` with uncertainty ``-|logit|``).

    logits [N, 1, h, w] -> [N, num_points, 2]: ``int(num_points * oversample_ratio)`` uniform candidates
    per mask, of which the ``int(importance_sample_ratio * num_points)`` most uncertain are kept (in no
    particular order: the losses sum over points, and an unsorted top-k is twice as fast on the CPU),
    followed by fresh uniform points up to ``num_points``. Draws candidates, then the
    fresh points, from ``generator`` (on logits' device) or the global RNG. No gradient flows.
    """
    check_tensor("logits", logits, 4, FLOAT_DTYPES)
    if logits.shape[1] != 1:
        raise ValueError(f"logits: expected [N, 1, h, w] (one mask per row), got shape {tuple(logits.shape)}")
    _check_count("num_points", num_points)
    check_finite_scalar("oversample_ratio", oversample_ratio)
    check_finite_scalar("importance_sample_ratio", importance_sample_ratio)
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio: expected >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio: expected a fraction in [0, 1], got {importance_sample_ratio}")
    source = logits.detach().float()
    return importance_points(logits.shape[0], num_points, oversample_ratio, importance_sample_ratio,
                             lambda candidates: -point_sample(source, candidates)[:, 0].abs(), logits.device,
                             generator)


def importance_points(n: int, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                      uncertainty: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None,
                      generator: Optional[torch.Generator] = None, out: Optional[torch.Tensor] = None,
                      workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The draws and the top-k of :func:`uncertain_point_coords` for ``n`` masks, the candidates
    [n, S, 2] ranked by ``uncertainty(candidates)`` -> [n, S] (higher: kept first). The fused
    criterion passes ``ops.point_uncertainty`` on the matched rows of a layer's logits, which reads
    them in place; the draws are the same. ``out``: a float32 [n, num_points, 2] tensor to write the
    points into (a slice of every layer's points). ``workspace``: a contiguous float32 buffer of at
    least n x S x 2 elements to draw the candidates into (the same numbers as a fresh tensor). Arguments
    are not checked here."""
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    if out is None:
        out = torch.empty(n, num_points, 2, device=device, dtype=torch.float32)
    with torch.no_grad():
        into = workspace[:n * num_sampled * 2].view(n, num_sampled, 2) if workspace is not None else None
        candidates = _uniform(n, num_sampled, 2, device=device, generator=generator, out=into)
        idx = uncertainty(candidates).topk(num_uncertain, dim=1, sorted=False).indices  # [n, k]
        # Each (x, y) pair moved as one 8-byte element: one gather of [n, k] straight into the
        # output, where gathering the pairs as floats needs a [n, k, 2] index and then a copy.
        torch.gather(_pairs(candidates), 1, idx, out=_pairs(out).narrow(1, 0, num_uncertain))
        out.narrow(1, num_uncertain, num_points - num_uncertain).copy_(
            _uniform(n, num_points - num_uncertain, 2, device=device, generator=generator))
    return out


def _pairs(points: torch.Tensor) -> torch.Tensor:
    """float32 [n, S, 2] (x, y) points, each pair read as one int64: [n, S], a view."""
    return points.view(torch.int64)[..., 0]


def point_mask_cost(pred_logits_points: torch.Tensor, target_points: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The matcher's mask costs on shared points, in float32 (also under autocast).

    pred_logits_points [Q, P] logits, target_points [N, P] in [0, 1] -> (bce [Q, N], dice [Q, N]):
    bce[q, n] = mean_p BCE(x_qp, t_np); dice[q, n] = 1 - (2 sum_p s_qp t_np + 1) / (sum_p s_qp + sum_p t_np + 1),
    s = sigmoid(x).
    """
    check_tensor("pred_logits_points", pred_logits_points, 2, FLOAT_DTYPES)
    check_tensor("target_points", target_points, 2)
    check_same_device(pred_logits_points=pred_logits_points, target_points=target_points)
    P = pred_logits_points.shape[1]
    if target_points.shape[1] != P:
        raise ValueError(f"target_points: expected [N, {P}] (the predictions' points), got shape "
                         f"{tuple(target_points.shape)}")
    with torch.autocast(pred_logits_points.device.type, enabled=False):
        x, t = pred_logits_points.float(), target_points.float()
        # BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0): two products instead of a [Q, N, P] tensor.
        pos = F.softplus(-x)  # BCE(x, 1)
        neg = F.softplus(x)  # BCE(x, 0)
        bce = (pos @ t.T + neg @ (1 - t).T) / P
        s = x.sigmoid()
        dice = 1 - (2 * (s @ t.T) + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return bce, dice


def point_mask_loss(pred_points: torch.Tensor, target_points: torch.Tensor, num_masks
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The criterion's mask losses on sampled points, float32 scalars (also under autocast).

    pred_points [N, P] logits of the matched predictions, target_points [N, P] in [0, 1] (the targets
    sampled at the same points) -> (loss_mask, loss_dice): sum_n mean_p BCE(x_np, t_np) / num_masks and
    sum_n [1 - (2 sum_p s t + 1) / (sum_p s + sum_p t + 1)] / num_masks.
    """
    check_tensor("pred_points", pred_points, 2, FLOAT_DTYPES)
    check_tensor("target_points", target_points, 2)
    check_same_device(pred_points=pred_points, target_points=target_points)
    if target_points.shape != pred_points.shape:
        raise ValueError(f"target_points: expected the shape of pred_points {tuple(pred_points.shape)}, "
                         f"got {tuple(target_points.shape)}")
    check_finite_scalar("num_masks", num_masks)
    if float(num_masks) <= 0:
        raise ValueError(f"num_masks: expected > 0, got {float(num_masks)}")
    with torch.autocast(pred_points.device.type, enabled=False):
        x, t = pred_points.float(), target_points.float()
        loss_mask = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1).sum() / num_masks
        s = x.sigmoid()
        dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
        loss_dice = dice.sum() / num_masks
    return loss_mask, loss_dice


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
