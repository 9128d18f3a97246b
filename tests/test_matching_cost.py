"""ops.matching_cost: every fused backend that runs on this machine against the reference.

Per-image parity at odd sizes (prediction sizes that do not divide the target size, targets larger
and smaller than the predictions), batches that mix images without targets and with many, Q < N
and Q > N, fp16/bf16 predictions, every target dtype, non-contiguous inputs, saturated logits; the
+inf padding past each image's targets; bad input rejected with a clear error.
"""
import pytest
import torch

from conftest import DEVICES
from fastmaskformer import ops
from backend_checks import assert_cost_matches_reference, assert_rejected_before_backend

ops.load_backends()
BACKENDS = [b for b, be in ops.matching_cost.backends.items() if b != "reference" and be.available() is None]


def _takes(backend: str, device: str) -> bool:
    probe = _inputs(1, 2, 3, 4, 4, 8, 8, [1], device)
    return ops.matching_cost.backends[backend].supports(*probe) is None


def _targets(n, H, W, device, dtype=torch.bool):
    t = torch.rand(n, H, W, device=device)
    return t.to(dtype) if dtype.is_floating_point else (t > 0.5).to(dtype)


def _inputs(B, Q, K, h, w, H, W, ns, device, dtype=torch.float32, mask_dtypes=(torch.bool,), spread=3.0):
    logits = (torch.randn(B, Q, K + 1, device=device) * 2).to(dtype)
    masks = (torch.randn(B, Q, h, w, device=device) * spread).to(dtype)
    labels = [torch.randint(0, K, (n,), device=device) for n in ns]
    targets = [_targets(n, H, W, device, mask_dtypes[b % len(mask_dtypes)]) for b, n in enumerate(ns)]
    return logits, masks, labels, targets


def _check(backend, args, dtype=torch.float32, **kw):
    return assert_cost_matches_reference(ops.matching_cost, backend, args, dtype, **kw)


CASES = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DEVICES if _takes(b, d)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Q, K, h, w, H, W, targets per image): a non-integer scale with an empty image and Q < N; x4
# with Q > N; targets smaller than the predictions; identity size with N > 32 (several target
# tiles); a 1-pixel-high prediction; Q > 32 and more pixels than one CPU pixel block.
SHAPES = [(3, 7, 5, 9, 11, 37, 29, [4, 0, 9]), (2, 20, 10, 16, 16, 64, 64, [3, 5]), (2, 6, 4, 13, 17, 8, 10, [2, 7]),
          (1, 5, 3, 12, 12, 12, 12, [40]), (4, 3, 2, 1, 7, 5, 20, [0, 1, 0, 2]), (2, 37, 7, 23, 19, 50, 45, [33, 1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference(backend, device, shape, dtype):
    _check(backend, _inputs(*shape, device, dtype), dtype, cost_class=2.0, cost_mask=20.0, cost_dice=1.0)


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 2.0), (0.25, 0.0), (0.5, 1.0), (0.25, 2.5), (0.9, 0.5)])
@pytest.mark.parametrize("backend,device", CASES)
def test_focal_parameters(backend, device, alpha, gamma):
    args = _inputs(2, 6, 4, 7, 9, 20, 25, [3, 5], device)
    _check(backend, args, alpha=alpha, gamma=gamma, cost_class=0.5, cost_mask=5.0, cost_dice=3.0)


@pytest.mark.parametrize("mask_dtypes", [(torch.uint8,), (torch.float32,), (torch.float16,), (torch.bfloat16,),
                                         (torch.bool, torch.uint8), (torch.bool, torch.float32)], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_target_dtypes(backend, device, mask_dtypes):
    """Byte masks as they are; float masks are soft targets, read as the reference reads them."""
    _check(backend, _inputs(3, 5, 4, 6, 7, 19, 22, [2, 3, 4], device, mask_dtypes=mask_dtypes))


@pytest.mark.parametrize("backend,device", CASES)
def test_saturated_logits_stay_finite(backend, device):
    logits, masks, labels, targets = _inputs(2, 5, 3, 6, 5, 18, 15, [3, 2], device, spread=100.0)
    masks[0, 0] = 100.0
    masks[1, 1] = -100.0
    cost = _check(backend, (logits, masks, labels, targets))
    assert torch.isfinite(cost[0, :, :3]).all() and torch.isfinite(cost[1, :, :2]).all()


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    B, Q, K, h, w = 2, 5, 4, 7, 6
    logits = torch.randn(B, K + 1, Q, device=device).transpose(1, 2)
    masks = torch.randn(B, Q, w, h, device=device).transpose(2, 3)
    labels = [torch.randint(0, K, (2 * n,), device=device)[::2] for n in (3, 4)]
    targets = [_targets(n, 40, 50, device)[:, 1::2, ::3] for n in (3, 4)]
    assert not (logits.is_contiguous() or masks.is_contiguous() or targets[0].is_contiguous())
    _check(backend, (logits, masks, labels, targets))


@pytest.mark.parametrize("ns", [[], [0, 0], [0, 3]], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_empty(backend, device, ns):
    """No images, images without targets, and no queries."""
    _check(backend, _inputs(len(ns), 4, 3, 5, 5, 10, 10, ns, device))
    cost, sizes = ops.matching_cost(*_inputs(len(ns), 0, 3, 5, 5, 10, 10, ns, device), backend=backend)
    assert cost.shape == (len(ns), 0, max(ns, default=0)) and sizes.tolist() == ns


@pytest.mark.parametrize("backend,device", CASES)
def test_deterministic(backend, device):
    args = _inputs(3, 9, 5, 11, 13, 30, 31, [5, 7, 2], device)
    assert torch.equal(ops.matching_cost(*args, backend=backend)[0], ops.matching_cost(*args, backend=backend)[0])


def _bad_inputs(device):
    logits, masks, labels, targets = _inputs(2, 4, 3, 5, 5, 10, 10, [2, 1], device)
    meta = [t.to("meta") for t in targets]
    return [
        ("batch mismatch", (logits, masks[:1], labels, targets), ValueError, "pred_masks"),
        ("image count", (logits, masks, labels[:1], targets[:1]), ValueError, "2 images"),
        ("mask rank", (logits, masks, labels, [targets[0], targets[1][0]]), ValueError, "tgt_masks"),
        ("mask dtype", (logits, masks, labels, [t.long() for t in targets]), TypeError, "tgt_masks"),
        ("pred dtype", (logits, masks.to(torch.int32), labels, targets), TypeError, "pred_masks"),
        ("device mix", (logits, masks, labels, meta), ValueError, "meta"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("backend,device", CASES)
def test_bad_input_raises_before_the_backend_runs(backend, device, case, monkeypatch):
    assert_rejected_before_backend(ops.matching_cost, backend, _bad_inputs(device)[case], monkeypatch)


@pytest.mark.parametrize("bad", [3, -1])
@pytest.mark.parametrize("backend,device", [("reference", d) for d in DEVICES] + CASES)
def test_label_out_of_range(backend, device, bad):
    """Label values are not read by the op's checks (a host sync per call on a GPU): the reference
    and the CPU kernel reject them before computing; the CUDA kernel, which cannot raise without a
    sync, gives NaN in that target's column, which the solver rejects and the matcher explains."""
    logits, masks, labels, targets = _inputs(2, 4, 3, 5, 5, 10, 10, [2, 1], device)
    args = (logits, masks, [labels[0], torch.tensor([bad], device=device)], targets)
    if device == "cuda" and backend != "reference":
        cost, _ = ops.matching_cost(*args, backend=backend)
        assert torch.isnan(cost[1, :, 0]).all() and torch.isfinite(cost[0, :, :2]).all()
    else:
        with pytest.raises(ValueError, match="labels must lie in|tgt_labels: expected values in"):
            ops.matching_cost(*args, backend=backend)
