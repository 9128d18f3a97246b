"""ops.point_matching_cost: every fused backend that runs on this machine against the reference.

Per-image parity at odd sizes (prediction sizes that do not divide the target size, targets larger
and smaller than the predictions), points on the borders, outside [0, 1], exactly on pixel centres
and edges, batches that mix images without targets and with many, Q < N and Q > N, one point and
more than one CPU point block, fp16/bf16 predictions and points, every target dtype, non-contiguous
inputs, saturated logits; the +inf padding past each image's targets; NaN for labels outside
[0, K); bad input rejected with a clear error before the backend runs; the native op under
torch.library.opcheck, with the GIL released and the same result for any thread count.
"""
import math

import pytest
import torch

from backend_checks import assert_cost_matches_reference, assert_rejected_before_backend, assert_releases_gil
from conftest import DEVICES
from fastmaskformer import ops
from fastmaskformer._ext import native_error

ops.load_backends()
OP = ops.point_matching_cost
BACKENDS = [b for b, be in OP.backends.items() if b != "reference" and be.available() is None]
SCALARS = (2.0, 5.0, 5.0)  # Mask2Former's cost_class, cost_mask, cost_dice


def _targets(n, H, W, device, dtype=torch.bool):
    t = torch.rand(n, H, W, device=device)
    return t.to(dtype) if dtype.is_floating_point else (t > 0.5).to(dtype)


def _inputs(B, Q, K, h, w, H, W, ns, P, device, dtype=torch.float32, mask_dtypes=(torch.bool,), spread=3.0):
    logits = (torch.randn(B, Q, K + 1, device=device) * 2).to(dtype)
    masks = (torch.randn(B, Q, h, w, device=device) * spread).to(dtype)
    labels = [torch.randint(0, K, (n,), device=device) for n in ns]
    targets = [_targets(n, H, W, device, mask_dtypes[b % len(mask_dtypes)]) for b, n in enumerate(ns)]
    coords = torch.rand(B, P, 2, device=device) * 1.2 - 0.1  # about 1 point in 6 outside the maps
    return logits, masks, labels, targets, coords


def _takes(backend: str, device: str) -> bool:
    return OP.backends[backend].supports(*_inputs(1, 2, 3, 4, 4, 8, 8, [1], 3, device)) is None


def _check(backend, args, dtype=torch.float32, scalars=SCALARS):
    return assert_cost_matches_reference(OP, backend, (*args, *scalars), dtype)


CASES = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DEVICES if _takes(b, d)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Q, K, h, w, H, W, targets per image, P): a non-integer scale with an empty image and Q < N;
# x4 with Q > N and more points than one CPU block; targets smaller than the predictions; identity
# size with N > 32 (several CUDA target tiles); a 1-pixel-high prediction and a single point; Q > 32.
SHAPES = [(3, 7, 5, 9, 11, 37, 29, [4, 0, 9], 50), (2, 20, 10, 16, 16, 64, 64, [3, 5], 300),
          (2, 6, 4, 13, 17, 8, 10, [2, 7], 33), (1, 5, 3, 12, 12, 12, 12, [40], 17),
          (4, 3, 2, 1, 7, 5, 20, [0, 1, 0, 2], 1), (2, 37, 7, 23, 19, 50, 45, [33, 1], 97)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference(backend, device, shape, dtype):
    _check(backend, _inputs(*shape, device, dtype), dtype)


def _special_points(h, w, H, W):
    """Pixel centres and edges of both sizes, the borders and their corners, points just and far
    outside [0, 1]: [1, P, 2]."""
    xs = torch.cat([(torch.arange(w) + 0.5) / w, torch.arange(W + 1) / W, torch.tensor([-1e-3, 1 + 1e-3, -0.7, 1.9])])
    ys = torch.cat([(torch.arange(h) + 0.5) / h, torch.arange(H + 1) / H, torch.tensor([0.0, 1.0, -0.2, 1.2])])
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    return grid[None]


@pytest.mark.parametrize("backend,device", CASES)
def test_points_on_centres_edges_borders_and_outside(backend, device):
    h, w, H, W = 5, 7, 11, 13
    logits, masks, labels, targets, _ = _inputs(1, 6, 4, h, w, H, W, [5], 1, device)
    coords = _special_points(h, w, H, W).to(device)
    _check(backend, (logits, masks, labels, targets, coords))
    # Four points only outside the maps read zeros: BCE(0, 0) = log 2, sigmoid(0) = 1/2, so
    # dice = 1 - 1 / (4 * 1/2 + 0 + 1).
    far = torch.tensor([[[-0.6, 0.5], [1.6, 0.5], [0.5, -0.6], [0.5, 1.6]]], device=device)
    cost = _check(backend, (logits, masks, labels, targets, far), scalars=(0.0, 1.0, 1.0))
    torch.testing.assert_close(cost, torch.full_like(cost, math.log(2.0) + 2.0 / 3.0))


@pytest.mark.parametrize("mask_dtypes", [(torch.uint8,), (torch.float32,), (torch.float16,), (torch.bfloat16,),
                                         (torch.bool, torch.uint8), (torch.bool, torch.float32)], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_target_dtypes(backend, device, mask_dtypes):
    """Byte masks as they are; float masks are soft targets, read as the reference reads them."""
    _check(backend, _inputs(3, 5, 4, 6, 7, 19, 22, [2, 3, 4], 40, device, mask_dtypes=mask_dtypes))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_half_precision_points(backend, device, dtype):
    logits, masks, labels, targets, coords = _inputs(2, 5, 4, 9, 8, 21, 17, [3, 2], 60, device)
    _check(backend, (logits, masks, labels, targets, coords.to(dtype)))


@pytest.mark.parametrize("backend,device", CASES)
def test_saturated_logits_stay_finite(backend, device):
    logits, masks, labels, targets, coords = _inputs(2, 5, 3, 6, 5, 18, 15, [3, 2], 70, device, spread=100.0)
    masks[0, 0] = 100.0
    masks[1, 1] = -100.0
    cost = _check(backend, (logits, masks, labels, targets, coords))
    assert torch.isfinite(cost[0, :, :3]).all() and torch.isfinite(cost[1, :, :2]).all()


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    B, Q, K, h, w, P = 2, 5, 4, 7, 6, 45
    logits = torch.randn(B, K + 1, Q, device=device).transpose(1, 2)
    masks = torch.randn(B, Q, w, h, device=device).transpose(2, 3)
    labels = [torch.randint(0, K, (2 * n,), device=device)[::2] for n in (3, 4)]
    targets = [_targets(n, 40, 50, device)[:, 1::2, ::3] for n in (3, 4)]
    coords = torch.rand(B, 2, P, device=device).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (logits, masks, targets[0], coords))
    _check(backend, (logits, masks, labels, targets, coords))


@pytest.mark.parametrize("ns", [[], [0, 0], [0, 3]], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_empty(backend, device, ns):
    """No images, images without targets, and no queries."""
    _check(backend, _inputs(len(ns), 4, 3, 5, 5, 10, 10, ns, 9, device))
    cost, sizes = OP(*_inputs(len(ns), 0, 3, 5, 5, 10, 10, ns, 9, device), *SCALARS, backend=backend)
    assert cost.shape == (len(ns), 0, max(ns, default=0)) and sizes.tolist() == ns


@pytest.mark.parametrize("bad", [3, -1])
@pytest.mark.parametrize("backend,device", [("reference", d) for d in DEVICES] + CASES)
def test_label_out_of_range_gives_nan(backend, device, bad):
    """Label values are not read on the host (a sync per call on a GPU): a label outside [0, K),
    the no-object column included, makes its target's column NaN, which the solver rejects and the
    matcher explains; the other columns stay exact."""
    logits, masks, labels, targets, coords = _inputs(2, 4, 3, 5, 5, 10, 10, [2, 2], 20, device)
    args = (logits, masks, [labels[0], torch.tensor([0, bad], device=device)], targets, coords)
    cost, _ = OP(*args, *SCALARS, backend=backend)
    assert torch.isnan(cost[1, :, 1]).all() and torch.isfinite(cost[1, :, 0]).all()
    assert torch.isfinite(cost[0, :, :2]).all()


@pytest.mark.parametrize("shape", [(3, 9, 5, 11, 13, 30, 31, [5, 7, 2], 400), (1, 40, 5, 11, 13, 30, 31, [6], 700)],
                         ids=["images", "query-blocks"])
@pytest.mark.parametrize("backend,device", CASES)
def test_deterministic(backend, device, shape):
    """The same bits on 2 threads and on 1. The CPU splits images into query blocks when there are
    fewer images than threads (the second shape on 2 threads): the split changes no bit either, and
    matches the reference."""
    args = _inputs(*shape, device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _check(backend, args)
        torch.set_num_threads(1)
        assert torch.equal(first, OP(*args, *SCALARS, backend=backend)[0])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", CASES)
def test_a_nan_logit_reaches_only_the_points_that_read_it(backend, device):
    """As grid_sample: a corner off the map is never read, so a NaN logit at the map's edge leaves
    finite the cost of a query whose points only pass beside it (one far outside the map, level
    with it); a point whose taps include it makes that query's row NaN, and no other."""
    h, w = 6, 8
    logits, masks, labels, targets, _ = _inputs(1, 3, 4, h, w, 12, 16, [2], 1, device)
    masks[0, 1, 3, 0] = float("nan")
    row = (3 + 0.5) / h
    g = torch.Generator().manual_seed(0)
    inside = torch.stack([torch.rand(300, generator=g) * 0.6 + 0.35, torch.rand(300, generator=g)], -1)
    beside = torch.tensor([[-0.6, row], [-1.5, row]])
    coords = torch.cat([inside, beside])[None].to(device)
    cost = _check(backend, (logits, masks, labels, targets, coords))
    assert torch.isfinite(cost).all()
    reading = torch.cat([coords, torch.tensor([[[0.5 / w, row]]], device=device)], 1)
    cost = OP(logits, masks, labels, targets, reading, *SCALARS, backend=backend)[0]
    assert torch.isnan(cost[0, 1]).all() and torch.isfinite(cost[0, [0, 2]]).all()
    _check(backend, (logits[:, [0, 2]], masks[:, [0, 2]], labels, targets, reading))  # the other queries


def _bad_inputs(device):
    logits, masks, labels, targets, coords = _inputs(2, 4, 3, 5, 5, 10, 10, [2, 1], 8, device)
    return [
        ("batch mismatch", (logits, masks[:1], labels, targets, coords), ValueError, "pred_masks"),
        ("image count", (logits, masks, labels[:1], targets[:1], coords), ValueError, "2 images"),
        ("mask dtype", (logits, masks, labels, [t.long() for t in targets], coords), TypeError, "tgt_masks"),
        ("coords shape", (logits, masks, labels, targets, coords[..., :1]), ValueError, r"coords: expected \[B, P, 2\]"),
        ("coords batch", (logits, masks, labels, targets, coords[:1]), ValueError, "coords"),
        ("no points", (logits, masks, labels, targets, coords[:, :0]), ValueError, "P >= 1"),
        ("coords dtype", (logits, masks, labels, targets, coords.long()), TypeError, "coords"),
        ("coords device", (logits, masks, labels, targets, coords.to("meta")), ValueError, "meta"),
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("backend,device", CASES)
def test_bad_input_raises_before_the_backend_runs(backend, device, case, monkeypatch):
    assert_rejected_before_backend(OP, backend, _bad_inputs(device)[case], monkeypatch)


# ---- the native op itself ----

NATIVE = pytest.mark.skipif(native_error() is not None, reason=str(native_error()))
DEVICE_PARAMS = [pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in DEVICES]


def _native_args(device, dtype=torch.float32, B=2, Q=5, ns=(3, 0)):
    logits, masks, labels, targets, coords = _inputs(B, Q, 4, 6, 7, 15, 16, list(ns), 30, device, dtype)
    return [logits, masks, torch.cat(labels), targets, coords, *SCALARS]


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck(device, dtype):
    torch.library.opcheck(torch.ops.fastmaskformer.point_matching_cost.default, _native_args(device, dtype))
    args = _native_args(device)
    assert OP.choose("auto", (args[0], args[1], [args[2]], args[3], args[4]), {}).name == "native"


@NATIVE
def test_native_op_checks_its_arguments():
    """Called directly (no Python checks first), the op still names the bad argument."""
    args = _native_args("cpu")
    with pytest.raises(ValueError, match=r"coords: expected \[B, P, 2\]"):
        torch.ops.fastmaskformer.point_matching_cost(*args[:4], args[4][:, :, :1], *SCALARS)
    with pytest.raises(ValueError, match="tgt_labels: expected 3 labels"):
        torch.ops.fastmaskformer.point_matching_cost(args[0], args[1], args[2][:2], *args[3:])


@NATIVE
def test_releases_the_gil():
    args = _native_args("cpu", B=4, Q=50, ns=(20,) * 4)
    args[4] = torch.rand(4, 4000, 2)
    assert_releases_gil(lambda: torch.ops.fastmaskformer.point_matching_cost(*args))
